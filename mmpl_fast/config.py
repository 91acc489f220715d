"""Model configuration presets (frozen, validated). The only place model geometry is written down."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class ModelConfig:
    """Geometry of a Wan2.1-style causal DiT.

    Wan2.1 facts: RMS q/k norm over the whole hidden size, affine LayerNorm only before cross-attention,
    GELU(tanh) FFN, six-way adaLN per block plus a learned table, 3D RoPE with theta 1e4 and `rope_max`
    positions per axis, patch (1, 2, 2).
    """

    name: str
    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type in ("int",) and not isinstance(getattr(self, f.name), int):
                raise TypeError(f"ModelConfig.{f.name}: expected an int, got {getattr(self, f.name)!r}")
        for key in ("dim", "num_heads", "num_layers", "ffn_dim", "freq_dim", "text_dim", "text_len",
                    "in_channels", "out_channels", "rope_max"):  # fmt: skip
            if getattr(self, key) <= 0:
                raise ValueError(f"ModelConfig.{key} must be positive, got {getattr(self, key)}")
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} does not divide dim={self.dim}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.dim/num_heads gives an odd head_dim {self.head_dim}; RoPE needs it even")
        if self.head_dim < 6:
            raise ValueError(f"ModelConfig head_dim {self.head_dim} is too small for 3D RoPE (needs >= 6)")
        if self.freq_dim % 2:
            raise ValueError(f"ModelConfig.freq_dim must be even, got {self.freq_dim}")
        if len(self.patch_size) != 3 or any(p <= 0 for p in self.patch_size):
            raise ValueError(f"ModelConfig.patch_size must be three positive ints, got {self.patch_size}")
        if self.patch_size[0] != 1:
            raise ValueError(f"ModelConfig.patch_size[0] must be 1 (one KV page = one latent frame): {self.patch_size}")
        if not self.eps > 0:
            raise ValueError(f"ModelConfig.eps must be > 0, got {self.eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens of one latent frame (= one KV page)."""
        ph, pw = self.patch_size[1:]
        if latent_height % ph or latent_width % pw:
            raise ValueError(f"latent size {latent_height}x{latent_width} is not divisible by the patch {ph}x{pw}")
        return (latent_height // ph) * (latent_width // pw)

    def num_parameters(self) -> int:
        """Parameter count of the transformer (used for memory accounting without building it)."""
        d, f, c_in, c_out = self.dim, self.ffn_dim, self.in_channels, self.out_channels
        patch = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        attn = 4 * (d * d + d) + 2 * d  # q k v o + rms norm weights
        block = 2 * attn + 2 * d + (d * f + f) + (f * d + d) + 6 * d  # self, cross, norm3 affine, ffn, modulation
        embed = (c_in * patch * d + d) + (self.text_dim * d + d) + (d * d + d) + (self.freq_dim * d + d) + (d * d + d)
        embed += d * 6 * d + 6 * d
        head = d * c_out * patch + c_out * patch + 2 * d
        return embed + self.num_layers * block + head

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A preset by name: one of `PRESETS`."""
        if not isinstance(name, str):
            raise TypeError(f"config name must be a str, got {type(name).__name__}")
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model config {name!r}; presets: {', '.join(PRESETS)}") from None


PRESETS: dict[str, ModelConfig] = {
    # CPU-sized, a few MB: tests, the embedded model and laptop runs.
    "tiny": ModelConfig(
        name="tiny", dim=128, num_heads=4, num_layers=2, ffn_dim=256, freq_dim=64, text_dim=64, text_len=16
    ),
    # The embedded default model (`mmpl_fast/assets/embedded`), trained on the procedural world on a laptop CPU.
    "embedded": ModelConfig(
        name="embedded", dim=128, num_heads=4, num_layers=4, ffn_dim=384, freq_dim=64, text_dim=64, text_len=32
    ),
    # Its successor's geometry, for a 4x-spatial `WorldVAE` (16x16 latents of a 64-pixel frame, 4x4 patches).
    "embedded-4x": ModelConfig(
        name="embedded-4x",
        dim=192,
        num_heads=6,
        num_layers=4,
        ffn_dim=576,
        freq_dim=64,
        text_dim=64,
        text_len=32,
        patch_size=(1, 4, 4),
    ),
    "wan2.1-t2v-1.3b": ModelConfig(name="wan2.1-t2v-1.3b", dim=1536, num_heads=12, num_layers=30, ffn_dim=8960),
    "wan2.1-t2v-14b": ModelConfig(name="wan2.1-t2v-14b", dim=5120, num_heads=40, num_layers=40, ffn_dim=13824),
}


def resolve_config(config: str | ModelConfig) -> ModelConfig:
    """Accept a preset name or a ModelConfig."""
    if isinstance(config, ModelConfig):
        return config
    return ModelConfig.from_name(config)
