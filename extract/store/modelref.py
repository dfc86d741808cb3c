"""The one reading of a model name as a user writes it: `arch`, `arch.tag`, `arch=FILE`, plus `--weights`.

Nothing here knows the registry (that is `extract.registry.models.resolve_weights`, which turns a
ModelRef into a file and a preprocessing); this only splits the text, so the cache catalog and
probe can read names without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from extract.core.errors import UserError

DEFAULT = "default"
NONE = "none"


@dataclass(frozen=True)
class ModelRef:
    """An architecture and a weights choice: 'default', 'none', a registry tag, or a file path."""

    arch: str
    weights: str = DEFAULT
    spelled: str = ""            # the text as given (for messages)

    @classmethod
    def parse(cls, model: str, weights: str | None = DEFAULT, known=()) -> "ModelRef":
        """`resnet50`, `resnet50.swav`, `cifar_resnet20=path/to/file.th`, with `--weights` (None: random init).

        `known`: architecture names that contain a dot themselves (never split). A tag in the name
        and a different `weights` is a UserError naming both.
        """
        text = model.strip()
        if not text:
            raise UserError("empty model name")
        given = NONE if weights is None else (str(weights).strip() or DEFAULT)
        arch, sep, in_name = text.partition("=")
        if not sep:
            lowered = {k.lower() for k in known}
            if text.lower().replace("-", "_") in lowered:
                arch, in_name = text, ""
            else:
                arch, _, in_name = text.partition(".")
        if not arch or (sep and not in_name):
            raise UserError(f"cannot read the model name {model!r}: use arch, arch.tag or arch=FILE")
        if in_name and given.lower() != DEFAULT and given.lower() != in_name.lower():
            raise UserError(f"--model {model} already names weights {in_name!r}; drop --weights {given} "
                            f"or use --model {arch} --weights {given}")
        return cls(arch, in_name or given, text)

    @property
    def is_default(self) -> bool:
        return self.weights.lower() == DEFAULT

    def same_model(self, stored_model: str, stored_tag: str | None = None) -> bool:
        """Whether a stored identity's model (`arch` or `arch.tag`) is the one this names.

        `stored_tag`: the weights tag the file recorded (its provenance), so `arch.DEFAULT_TAG`
        finds the cache named `arch` without the registry."""
        if self.spelled == stored_model:
            return True
        arch, _, tag = stored_model.partition(".")
        if arch.lower() != self.arch.lower():
            return False
        if self.is_default:
            return not tag
        wanted = self.weights.lower()
        return wanted == (tag or stored_tag or "").lower()


def split_models(values) -> list[str]:
    """['a,b', 'c'] -> ['a', 'b', 'c'] in order, each once."""
    if not values:
        return []
    if isinstance(values, str):
        values = [values]
    return list(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))
