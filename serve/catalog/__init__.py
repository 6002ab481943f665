"""What a request's `model` names: adapter versions from the registry, their files on local disk, their fidelity."""
