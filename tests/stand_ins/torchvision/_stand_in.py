def placeholder(module: str, name: str) -> type:
    """A class standing for a torchvision name that timm imports but its model code never uses."""

    def refuse(self, *args, **kwargs):
        raise NotImplementedError(f"{module}.{name}: torchvision is a test stand-in here")

    return type(name, (), {"__init__": refuse, "__call__": refuse, "__module__": module})


def module_getattr(module: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(module, name)

    return __getattr__
