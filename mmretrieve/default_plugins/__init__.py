"""Built-in plugins, registered through pluggy exactly as third-party ones are."""
