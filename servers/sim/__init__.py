"""Stand-ins for external providers: real servers on loopback speaking the provider's HTTP.

Each one is started with `sysdesign sim <provider>`; adapters call it exactly as
they would call the provider, so a real provider is a configuration change.
"""
