"""Everything that crosses the wire: DHT keys and signed peer records, RPC message schemas and limits,
the tensor codec, and the training-sync protocol. Imports neither ``peer`` nor ``swarm``."""

PROTOCOL_VERSION = 1
