"""Web page + JSON API."""
