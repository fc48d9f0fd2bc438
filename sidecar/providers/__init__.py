"""Providers: the adapters between the gateway and the places that run models."""
