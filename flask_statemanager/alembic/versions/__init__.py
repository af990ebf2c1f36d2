"""The revisions of flask-statemanager's tables, oldest first by their ``revision`` id."""
