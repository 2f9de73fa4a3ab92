"""The HTTP face: one module of handlers per API area, each a class whose `routes` adds its paths.

Handlers read and change the simulated cluster only through its parts (`SimConsul.catalog`,
`.agent`, ...), under the shared lock, and answer with Consul's JSON, status codes and texts.
"""
