"""Integrations with other serving systems (Ray Serve: `inlaid.integrations.ray`)."""
