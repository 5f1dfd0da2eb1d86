"""The HTTP edge: POST /chat composes embed, retrieve and generate."""
