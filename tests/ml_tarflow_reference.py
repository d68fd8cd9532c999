"""An independent re-implementation of apple/ml-tarflow's `transformer_flow.Model`, for tests only.

It reads Apple's own state dict (the `tests/fixtures/*.pth` layout: `blocks.{i}.pos_embed`, `class_embed`,
`attn_blocks.{j}.attention.{norm,qkv,proj}`, `mlp.{norm,main.0,main.2}`, `proj_out`, `var`) and does what Apple's
`MetaBlock.forward` / `MetaBlock.reverse` / `Model.reverse` do, operation for operation and in Apple's dtypes:

- LayerNorm on `x.float()`, cast back to the input dtype;
- the residual stream is whatever `proj_in(x) + pos_embed` promotes to (float32 under autocast: the embedding is a
  float32 parameter), linear layers and attention in the autocast dtype;
- `exp` of the log-scale in float32, cast back to the log-scale's dtype;
- the log-determinant as `-xa.mean(dim=[1, 2])` in the log-scale's dtype (bfloat16 under autocast: Apple does NOT
  upcast it);
- sampling one patch at a time with a key/value cache per branch, guidance `cond + g * (cond - uncond)` in the
  projection's dtype, attention temperature on the unconditional branch only.

It shares no code with `tarflow_hf` (it never imports it), so a test that compares the package with it compares
two implementations. Its float32 results are checked against Apple's fixtures in `test_bf16_reference.py`
(`test_reference_reimplementation_reproduces_apples_fixtures`), which is what licenses using it where the fixtures
have no answer (bfloat16 autocast, guidance scales below 1).

Deliberate knob: `skip_negative_guidance` (Apple's `if guidance > 0`). tarflow-hf documents that it applies
guidance whenever `guidance_scale != 1`, i.e. also for Apple's g < 0, so tests use `skip_negative_guidance=False`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

FIXTURES = Path(__file__).parent / "fixtures"
APPLE_HEAD_DIM = 64  # the only head size Apple's code uses


class AppleTarFlow:
    def __init__(self, state_dict: dict[str, torch.Tensor], config: dict):
        self.sd = state_dict
        self.patch_size = config["patch_size"]
        self.img_size = config["img_size"]
        self.in_channels = config["in_channels"]
        self.num_blocks = config["num_blocks"]
        self.layers = config["layers_per_block"]
        self.nvp = config["nvp"]
        self.num_classes = config["num_classes"]
        self.width = config["channels"]
        self.heads = self.width // APPLE_HEAD_DIM

    @classmethod
    def from_fixture(cls, name: str) -> tuple[AppleTarFlow, dict, dict[str, torch.Tensor]]:
        meta = json.loads((FIXTURES / f"{name}.json").read_text())
        state = torch.load(FIXTURES / f"{name}.pth", weights_only=True)
        expected = torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)
        return cls(state, meta["config"]), meta, expected

    # ------------------------------------------------------------------------------------------ pieces
    def _p(self, block: int, name: str) -> torch.Tensor:
        return self.sd[f"blocks.{block}.{name}"]

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self.sd[prefix + ".weight"], self.sd[prefix + ".bias"])

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        # Apple: self.norm(x.float()).type(x.dtype), nn.LayerNorm default eps
        out = F.layer_norm(x.float(), (x.shape[-1],), self.sd[prefix + ".weight"], self.sd[prefix + ".bias"], 1e-5)
        return out.type(x.dtype)

    def _attention(self, x, prefix, mask=None, temp=1.0, cache=None):
        b, t, c = x.shape
        h = self._norm(x, prefix + ".norm")
        q, k, v = self._linear(h, prefix + ".qkv").reshape(b, t, 3 * self.heads, -1).transpose(1, 2).chunk(3, dim=1)
        if cache is not None:  # Apple's sample mode: append, then attend to everything so far
            cache[0].append(k)
            cache[1].append(v)
            k, v = torch.cat(cache[0], dim=2), torch.cat(cache[1], dim=2)
        scale = (APPLE_HEAD_DIM**-0.25) ** 2 / temp
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self._linear(out.transpose(1, 2).reshape(b, t, c), prefix + ".proj")

    def _mlp(self, x, prefix):
        h = self._norm(x, prefix + ".norm")
        return self._linear(F.gelu(self._linear(h, prefix + ".main.0")), prefix + ".main.2")

    def _layers(self, block, x, mask=None, temp=1.0, caches=None):
        for j in range(self.layers):
            prefix = f"blocks.{block}.attn_blocks.{j}"
            x = x + self._attention(x, prefix + ".attention", mask, temp, None if caches is None else caches[j])
            x = x + self._mlp(x, prefix + ".mlp")
        return x

    def _split(self, out):
        if self.nvp:
            return out.chunk(2, dim=-1)
        return torch.zeros_like(out), out

    @staticmethod
    def _perm(block: int, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x.flip(dims=[dim]) if block % 2 == 1 else x

    def patchify(self, images):
        return F.unfold(images, self.patch_size, stride=self.patch_size).transpose(1, 2)

    def unpatchify(self, patches):
        size = (self.img_size, self.img_size)
        return F.fold(patches.transpose(1, 2), size, self.patch_size, stride=self.patch_size)

    # --------------------------------------------------------------------------------------- density
    def block_forward(self, i, x, y=None):
        x = self._perm(i, x)
        pos = self._perm(i, self._p(i, "pos_embed"), dim=0)
        x_in = x
        x = self._linear(x, f"blocks.{i}.proj_in") + pos
        if self.num_classes:
            embed = self._p(i, "class_embed")
            if y is None:
                x = x + embed.mean(dim=0)
            elif (y < 0).any():
                m = (y < 0).float().view(-1, 1, 1)
                x = x + ((1 - m) * embed[y] + m * embed.mean(dim=0))
            else:
                x = x + embed[y]
        mask = torch.tril(torch.ones(x.shape[1], x.shape[1])).bool()
        x = self._linear(self._layers(i, x, mask), f"blocks.{i}.proj_out")
        x = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        xa, xb = self._split(x)
        scale = (-xa.float()).exp().type(xa.dtype)
        return self._perm(i, (x_in - xb) * scale), -xa.mean(dim=[1, 2]), xa

    def forward(self, images, y=None):
        """(z, Apple's logdets: per-block MEAN over dimensions summed over blocks, [per-block log-scales xa])."""
        x = self.patchify(images)
        logdets = torch.zeros((), device=x.device)
        log_scales = []
        for i in range(self.num_blocks):
            x, logdet, xa = self.block_forward(i, x, y)
            logdets = logdets + logdet
            log_scales.append(xa)
        return x, logdets, log_scales

    # -------------------------------------------------------------------------------------- sampling
    def _reverse_step(self, i, x, pos, t, y, temp, caches):
        h = self._linear(x[:, t : t + 1], f"blocks.{i}.proj_in") + pos[t : t + 1]
        if self.num_classes:
            embed = self._p(i, "class_embed")
            h = h + (embed[y] if y is not None else embed.mean(dim=0))
        h = self._layers(i, h, temp=temp, caches=caches)
        return self._split(self._linear(h, f"blocks.{i}.proj_out"))

    def block_reverse(self, i, x, y, guidance, guide_what, attn_temp, annealed, skip_negative_guidance):
        x = self._perm(i, x).clone()
        pos = self._perm(i, self._p(i, "pos_embed"), dim=0)
        cond = [([], []) for _ in range(self.layers)]
        uncond = [([], []) for _ in range(self.layers)]
        guided = (guidance > 0 if skip_negative_guidance else guidance != 0) and guide_what
        n = x.size(1)
        for t in range(n - 1):
            za, zb = self._reverse_step(i, x, pos, t, y, 1.0, cond)
            if guided:
                za_u, zb_u = self._reverse_step(i, x, pos, t, None, attn_temp, uncond)
                g = (t + 1) / (n - 1) * guidance if annealed else guidance
                if "a" in guide_what:
                    za = za + g * (za - za_u)
                if "b" in guide_what:
                    zb = zb + g * (zb - zb_u)
            scale = za[:, 0].float().exp().type(za.dtype)
            x[:, t + 1] = x[:, t + 1] * scale + zb[:, 0]
        return self._perm(i, x)

    def reverse(
        self,
        noise,
        y=None,
        guidance=0.0,
        guide_what="ab",
        attn_temp=1.0,
        annealed_guidance=False,
        skip_negative_guidance=True,
    ):
        """Apple's `Model.reverse` (g = Apple's guidance, i.e. diffusers' guidance_scale - 1); images (B, C, H, W)."""
        x = noise * self.sd["var"].sqrt()
        for i in reversed(range(self.num_blocks)):
            x = self.block_reverse(i, x, y, guidance, guide_what, attn_temp, annealed_guidance, skip_negative_guidance)
        return self.unpatchify(x)

    # ------------------------------------------------------------------------------------- likelihood
    def log_likelihood(self, images, y=None):
        """log p(x) in nats per image, straight from the change-of-variables formula with Apple's logdets (a mean
        per dimension, so the true log|det| is logdets * T * D) and the standard normal prior."""
        z, logdets, _ = self.forward(images, y)
        dims = z.shape[1] * z.shape[2]
        return -0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * dims * math.log(2 * math.pi) + logdets * dims


def bits_per_dim_from_log_likelihood(log_likelihood: torch.Tensor, dims: int) -> torch.Tensor:
    """Apple's `evaluate_bpd.py`: pixels in [-1, 1] are 256 levels of width 2/256, so each dimension's density
    is divided by 128: bpd = (-log p(x) / dims + log 128) / log 2."""
    return (-log_likelihood / dims + math.log(128)) / math.log(2)
