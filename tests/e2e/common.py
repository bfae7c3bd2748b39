"""What the SDK scripts share."""


def strip(obj):
    """The SDK object as a dict, without `created` (a wall-clock second, not content)."""
    d = obj.model_dump()
    d.pop("created", None)
    return d
