"""HTTP/1.1 as bytes in, values out, and values back to bytes: no sockets, no asyncio.

`parser` turns a request or response head into a value (httptools/llhttp does the
syntax), `framing` decodes bodies from a buffer, `writer` encodes heads and chunks,
`headers` knows which fields are hop-by-hop. Everything here can be fed one byte at a
time and fuzzed.
"""
