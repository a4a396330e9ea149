"""The journal as read-only web pages (`overhaul serve`); see overhaul.web.app."""
