"""TarFlow model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .guidance import GuidanceRule


@strict(accept_kwargs=True)
class TarFlowConfig(PreTrainedConfig):
    r"""
    Configuration of a [`TarFlowModel`]: a stack of causal-transformer affine flow blocks over image patches
    ("Normalizing Flows are Capable Generative Models", Zhai et al. 2024).

    Args:
        image_size (`int`, defaults to 64): height and width of the (square) images.
        num_channels (`int`, defaults to 3): image channels.
        patch_size (`int`, defaults to 4): side of the square patches the image is cut into.
        hidden_size (`int`, defaults to 256): transformer width (`channels` in Apple's code).
        num_blocks (`int`, defaults to 4): number of flow blocks; consecutive blocks reverse the patch order.
        layers_per_block (`int`, defaults to 2): transformer layers inside each flow block.
        head_dim (`int`, defaults to 64): width of one attention head.
        mlp_ratio (`int`, defaults to 4): MLP expansion factor.
        nvp (`bool`, defaults to `True`): predict a log-scale as well as a shift (non volume preserving).
        num_classes (`int`, defaults to 0): number of classes for conditioning; 0 means unconditional. It is
            transformers' `num_labels` (`TarFlowConfig(num_labels=10)` is `num_classes=10`); `id2label` names the
            classes (given alone, its size is the number of classes).
        noise_std (`float`, defaults to 0.05): std of the Gaussian noise the model was trained with; the
            denoising step uses it.
        default_guidance_scale (`float`, defaults to 1.0): guidance scale a pipeline uses when none is given
            (diffusers convention, 1.0 is no guidance).
        default_guidance_rule (`str`, defaults to `"extrapolate"`): guidance rule used when none is given,
            TarFlow's extrapolation; a rule name or `NAME:key=value,...` (see `tarflow_hf.guidance`).

    Example:

    ```python
    >>> from tarflow_hf import TarFlowConfig, TarFlowModel
    >>> config = TarFlowConfig(image_size=32, num_channels=3, patch_size=4, hidden_size=128, num_classes=10)
    >>> model = TarFlowModel(config)
    ```"""

    model_type = "tarflow"

    image_size: int = 64
    num_channels: int = 3
    patch_size: int = 4
    hidden_size: int = 256
    num_blocks: int = 4
    layers_per_block: int = 2
    head_dim: int = 64
    mlp_ratio: int = 4
    nvp: bool = True
    num_classes: int = 0
    noise_std: float = 0.05
    default_guidance_scale: float = 1.0
    default_guidance_rule: str = "extrapolate"

    def __post_init__(self, **kwargs):
        if isinstance(self.noise_std, int):
            self.noise_std = float(self.noise_std)
        if isinstance(self.default_guidance_scale, int):
            self.default_guidance_scale = float(self.default_guidance_scale)
        self._take_num_labels(kwargs.pop("num_labels", None))
        self._check_sizes()
        GuidanceRule.parse(self.default_guidance_rule)  # a bad one names itself
        has_labels, given_label2id = self.id2label is not None, self.label2id
        if has_labels and self.num_classes == 0:
            self.num_classes = len(self.id2label)  # class names given: one class each
        super().__post_init__(**kwargs)
        if self.num_classes > 0 and (not has_labels or len(self.id2label) != self.num_classes):
            if has_labels:
                raise ValueError(
                    f"id2label has {len(self.id2label)} entries but num_classes={self.num_classes}; "
                    "give one name per class"
                )
            self.id2label = {i: f"class_{i}" for i in range(self.num_classes)}
        if self.num_classes == 0 and not has_labels:
            self.id2label = {}
        self.label2id = self._checked_label2id(given_label2id)

    # transformers' `num_labels` (the size of `id2label`) is TarFlow's number of classes: one name per class.
    @property
    def num_labels(self) -> int:
        """The number of classes, `num_classes` (transformers' name for it)."""
        return self.num_classes

    @num_labels.setter
    def num_labels(self, num_labels: int) -> None:
        _check_num_labels(num_labels)
        if self.id2label is None or len(self.id2label) != num_labels:
            self.id2label = {i: f"class_{i}" for i in range(num_labels)}
            self.label2id = {name: i for i, name in self.id2label.items()}
        self.num_classes = num_labels

    def _take_num_labels(self, num_labels: int | None) -> None:
        """`TarFlowConfig(num_labels=N)` is `num_classes=N`; both given must agree."""
        if num_labels is None:
            return
        _check_num_labels(num_labels)
        if self.num_classes == 0:
            self.num_classes = num_labels
        elif self.num_classes != num_labels:
            raise ValueError(
                f"num_labels={num_labels} and num_classes={self.num_classes} disagree: a TarFlow's labels are its "
                "classes (num_labels is num_classes); give one of them"
            )

    def _checked_label2id(self, given: dict | None) -> dict:
        """`label2id` as given (transformers keeps it as it is; its ids may be strings, as in JSON) when it is
        `id2label`'s inverse, name by name; else derived from `id2label`, the names the model answers to (a config
        whose `id2label` was set without its `label2id` saves a stale one)."""
        derived = {name: i for i, name in self.id2label.items()}
        inverse = given is not None and set(given) == set(derived)
        if inverse and all(self.id2label.get(_as_id(i)) == name for name, i in given.items()):
            return given
        return derived

    def _check_sizes(self) -> None:
        # Plain ValueError (rather than a `validate_*` hook, which `@strict` wraps) so callers can catch it.
        sizes = ("image_size", "num_channels", "patch_size", "hidden_size", "num_blocks", "layers_per_block")
        for name in (*sizes, "head_dim", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be 0 (unconditional) or positive, got {self.num_classes}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                f"allowed patch sizes divide the image size"
            )
        if self.hidden_size % self.head_dim:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by head_dim={self.head_dim}; "
                "the width must be a whole number of attention heads"
            )

    @property
    def num_patches(self) -> int:
        """Length of the patch sequence, T."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch, D = channels * patch_size**2."""
        return self.num_channels * self.patch_size**2

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def num_attention_heads(self) -> int:
        """Attention heads of every layer (transformers' name; `num_heads`)."""
        return self.num_heads

    @property
    def num_hidden_layers(self) -> int:
        """Transformer layers of the whole flow, `num_blocks * layers_per_block` (transformers' name)."""
        return self.num_blocks * self.layers_per_block


def _check_num_labels(num_labels: object) -> None:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0:
        raise ValueError(f"num_labels (num_classes) must be an integer >= 0, got {num_labels!r}")


def _as_id(value: object) -> int | None:
    """A label id as `label2id` may hold it: an int, or its decimal string (JSON)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else None


__all__ = ["TarFlowConfig"]
