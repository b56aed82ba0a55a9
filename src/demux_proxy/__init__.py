"""demux-proxy: an HTTP/HTTPS forward proxy that sends each request from the next local address."""

__version__ = "0.1.0"
