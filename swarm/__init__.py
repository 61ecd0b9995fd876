"""What users touch: the client (``DistributedModelForCausalLM``), the ``swarm`` CLI and model loading."""


def __getattr__(name):
    if name in ("DistributedModelForCausalLM", "InferenceSession", "SwarmError"):
        from swarm import client

        return getattr(client, name)
    raise AttributeError(name)
