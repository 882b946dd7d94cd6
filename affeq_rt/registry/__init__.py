"""The backbone registry: one frozen BackboneSpec per network, specs as JSON files."""
