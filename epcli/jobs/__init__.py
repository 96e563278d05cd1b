"""One function per CLI command: files in, a frozen result dataclass out.

Jobs glue the library together (formats -> convert -> verify -> formats) and
never print; ``epcli.cli`` renders what they return.
"""
