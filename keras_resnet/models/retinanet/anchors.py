"""`AnchorGenerator`: the RetinaNet anchor grid for one input size.

Level `l` of the feature pyramid has stride `2**l` and a feature map of
`ceil(H / 2**l) x ceil(W / 2**l)` cells (what `ResNetBackbone` and `FPN`
produce: their strided convs pad like "same"). Each cell centre
`(stride * (j + 0.5), stride * (i + 0.5))` carries `len(scales) *
len(aspect_ratios)` anchors of side `size * scale` and aspect ratio
`width / height`, ordered scale-major then ratio, as keras-cv's
`AnchorGenerator`; default sizes are `4 * stride` (32 on P3 to 512 on P7)
as in RetinaNet (Lin et al., 2017). Anchors are concatenated level-major,
then row-major over cells, then per cell, which is the order in which
`RetinaNetDetector` flattens its head outputs.

`layout="torchvision"` gives torchvision's `AnchorGenerator` as its
RetinaNet builds it (`torchvision.models.detection.retinanet`), for models
imported from torchvision: per cell, ratio-major then scale (its
`generate_anchors`: `ws = (w_ratios[:, None] * scales[None, :]).view(-1)`);
sides `int(size * scale)` (its `_default_anchorgen`: 32, 40, 50 on P3);
half-sides computed in float32 and rounded to integers (`base_anchors.round()`,
half to even); cell `(i, j)` centred at `(stride_x * j, stride_y * i)`
with no half-stride offset, where the strides are the integer quotients
`H // h` and `W // w` of the input and feature sizes (so 53 and 64 for P6
of a 160x192 input, not 64). `aspect_ratios` are width / height in both
layouts; torchvision's are height / width, so its `(0.5, 1.0, 2.0)` (wide
first) is `(2.0, 1.0, 0.5)` here.

Anchors depend only on the (static) input size, so they are computed once
in NumPy and used as constants in the model, the label encoder and the
decoder.
"""

import math

import numpy as np

from keras_resnet_settings.errors import ConfigError

DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)
DEFAULT_SCALES = (1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0))
ANCHOR_LAYOUTS = ("keras_cv", "torchvision")


class AnchorGenerator:
    """Generates xyxy anchors for pyramid levels `min_level..max_level`.

    Args:
        min_level: finest pyramid level (stride `2**min_level`).
        max_level: coarsest pyramid level.
        sizes: base anchor side per level; None gives `4 * 2**level`
            (32, 64, 128, 256, 512 for levels 3..7).
        aspect_ratios: anchor `width / height` ratios.
        scales: multipliers of the base size at each location.
        layout: "keras_cv" (scale-major order, cells centred at
            `stride * (i + 0.5)`, exact sides) or "torchvision"
            (torchvision's RetinaNet anchors: ratio-major order, integer
            sides and half-sides, centres at `(H // h) * i`; see the module
            docstring).

    Example:
    >>> generator = AnchorGenerator()
    >>> generator(image_shape=(64, 64)).shape  # 9 * (64 + 16 + 4 + 1 + 1)
    (774, 4)
    >>> generator.feature_sizes((100, 100))
    [(13, 13), (7, 7), (4, 4), (2, 2), (1, 1)]
    >>> AnchorGenerator(aspect_ratios=(2.0, 1.0, 0.5), layout="torchvision")((64, 64))[:3]  # P3 cell (0, 0)
    array([[-23., -11.,  23.,  11.],
           [-28., -14.,  28.,  14.],
           [-35., -18.,  35.,  18.]], dtype=float32)
    """

    def __init__(
        self,
        min_level=3,
        max_level=7,
        sizes=None,
        aspect_ratios=DEFAULT_ASPECT_RATIOS,
        scales=DEFAULT_SCALES,
        layout="keras_cv",
    ):
        min_level, max_level = int(min_level), int(max_level)
        if not 1 <= min_level <= max_level:
            raise ConfigError(f"Need 1 <= min_level <= max_level, got min_level={min_level}, max_level={max_level}.")
        levels = list(range(min_level, max_level + 1))
        if sizes is None:
            sizes = [4.0 * 2**level for level in levels]
        sizes = [float(s) for s in sizes]
        if len(sizes) != len(levels) or any(s <= 0 for s in sizes):
            raise ConfigError(f"sizes must hold one positive size per level {levels}, got {sizes}.")
        aspect_ratios = [float(r) for r in aspect_ratios]
        scales = [float(s) for s in scales]
        if not aspect_ratios or not scales or any(v <= 0 for v in aspect_ratios + scales):
            raise ConfigError(f"aspect_ratios and scales must be non-empty and positive, got {aspect_ratios}, {scales}.")
        if layout not in ANCHOR_LAYOUTS:
            allowed = ", ".join(map(repr, ANCHOR_LAYOUTS))
            raise ConfigError(f"layout={layout!r} is not an anchor layout; allowed: {allowed}.")
        self.min_level = min_level
        self.max_level = max_level
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.scales = scales
        self.layout = layout

    @property
    def levels(self):
        return list(range(self.min_level, self.max_level + 1))

    @property
    def strides(self):
        return [2**level for level in self.levels]

    @property
    def num_anchors_per_location(self):
        return len(self.aspect_ratios) * len(self.scales)

    def feature_sizes(self, image_shape):
        """`(ceil(H / stride), ceil(W / stride))` for each level, finest first."""
        height, width = _image_size(image_shape)
        return [(math.ceil(height / stride), math.ceil(width / stride)) for stride in self.strides]

    def num_anchors(self, image_shape):
        """Total anchors for an input of `image_shape` (`(H, W)` or `(H, W, C)`)."""
        return sum(h * w for h, w in self.feature_sizes(image_shape)) * self.num_anchors_per_location

    def level_anchors(self, image_shape):
        """Dict `{level: (h * w * A, 4) float32 xyxy anchors}`."""
        if self.layout == "torchvision":
            return self._torchvision_anchors(image_shape)
        shapes = []  # (width, height) of the anchors at one location, before the size
        for scale in self.scales:
            for ratio in self.aspect_ratios:
                shapes.append((scale * math.sqrt(ratio), scale / math.sqrt(ratio)))
        shapes = np.asarray(shapes, dtype=np.float64)
        anchors = {}
        for level, size, stride, (rows, cols) in zip(
            self.levels, self.sizes, self.strides, self.feature_sizes(image_shape)
        ):
            cy, cx = np.meshgrid(stride * (np.arange(rows) + 0.5), stride * (np.arange(cols) + 0.5), indexing="ij")
            centers = np.stack([cx, cy], axis=-1).reshape(rows, cols, 1, 2)
            half = (size * shapes / 2.0).reshape(1, 1, -1, 2)
            boxes = np.concatenate([centers - half, centers + half], axis=-1)
            anchors[level] = boxes.reshape(-1, 4).astype(np.float32)
        return anchors

    def _torchvision_anchors(self, image_shape):
        """torchvision's `AnchorGenerator` (float32 maths as in `generate_anchors` and `grid_anchors`)."""
        height, width = _image_size(image_shape)
        # torchvision's h_ratios = sqrt(height / width); ours are width / height.
        h_ratios = np.sqrt(np.float32(1.0) / np.asarray(self.aspect_ratios, np.float32))
        w_ratios = np.float32(1.0) / h_ratios
        anchors = {}
        for level, size, (rows, cols) in zip(self.levels, self.sizes, self.feature_sizes(image_shape)):
            sides = np.asarray([int(size * scale) for scale in self.scales], np.float32)
            ws = (w_ratios[:, None] * sides[None, :]).reshape(-1)
            hs = (h_ratios[:, None] * sides[None, :]).reshape(-1)
            base = np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0))  # half to even, as torch.round
            shift_y, shift_x = np.meshgrid(np.arange(rows) * (height // rows), np.arange(cols) * (width // cols),
                                           indexing="ij")
            shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4).astype(np.float32)
            anchors[level] = (shifts + base[None]).reshape(-1, 4).astype(np.float32)
        return anchors

    def __call__(self, image_shape):
        """All anchors for `image_shape`, `(N, 4)` float32 xyxy, level-major."""
        return np.concatenate(list(self.level_anchors(image_shape).values()), axis=0)

    def get_config(self):
        return {
            "min_level": self.min_level,
            "max_level": self.max_level,
            "sizes": list(self.sizes),
            "aspect_ratios": list(self.aspect_ratios),
            "scales": list(self.scales),
            "layout": self.layout,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"AnchorGenerator({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"


def _image_size(image_shape):
    if len(image_shape) not in (2, 3) or any(d is None for d in image_shape[:2]):
        raise ConfigError(f"image_shape must be a static (height, width[, channels]), got {tuple(image_shape)}.")
    height, width = int(image_shape[0]), int(image_shape[1])
    if height < 1 or width < 1:
        raise ConfigError(f"image_shape must be positive, got {tuple(image_shape)}.")
    return height, width


__all__ = ["ANCHOR_LAYOUTS", "DEFAULT_ASPECT_RATIOS", "DEFAULT_SCALES", "AnchorGenerator"]
