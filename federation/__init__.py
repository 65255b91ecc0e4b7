"""loraflight federation: store, Flight server and client, discovery, sync, node, CLI.

Imports no torch and never grpcio at module load (a relay node runs without torch).
"""
