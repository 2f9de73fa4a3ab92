"""meshgw: a mesh gateway for federating Consul datacenters.

It reads the SNI of each TLS ClientHello, never terminates TLS, and splices the stream
to a local server or to the gateway of the destination datacenter.
"""

__version__ = "0.1.0"
