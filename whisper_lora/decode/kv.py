"""Whisper's transformers modules run by hand: the encoder, the key/value-cached decoder, alignment attention.

For one token transformers' decoder forward spends more time in Python (cache objects, masks, output
recording) than in arithmetic. `Network` calls the same submodules, LoRA layers included, in the same
order, and writes keys and values into preallocated buffers. Plain Linear layers are computed as
`weight @ x.T`: for the one to a few rows of a decoding step BLAS runs that layout 1.2-2.5x faster
than `x @ weight.T` (measured on a 2-core x86 CPU), and a step is mostly these matmuls, the largest
being the projection onto the 51,865-token vocabulary.

Every call takes `adapters`, one LoRA adapter name per row ("__base__" for none), handed to peft's
LoRA layers as `adapter_names`: one batch can hold rows for different adapters, and nothing global
(active adapter, forward hooks) is touched, so concurrent callers cannot disturb each other. `None`
leaves the model's own active adapter in charge (a merged model, or a model with one adapter).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FEW_ROWS = 32  # up to this many rows `weight @ x.T` beats `x @ weight.T` (decoding steps)
BASE_ROWS = "__base__"  # peft's adapter name for "no adapter" in a mixed batch

@dataclass
class Caches:
    """Keys and values of one batch of windows: self-attention (preallocated, filled up to `length`)
    and cross-attention (the encoder output projected once per window; keys transposed), per layer."""
    self_keys: list[torch.Tensor]
    self_values: list[torch.Tensor]
    cross_keys: list[torch.Tensor]
    cross_values: list[torch.Tensor]
    adapters: list[str] | None
    length: int = 0
    attention: torch.Tensor | None = None  # alignment heads' cross-attention of the last tokens run, when asked for

    def select(self, index: torch.Tensor) -> None:
        """Keep (or repeat, for beams) the rows in `index`."""
        for caches in (self.self_keys, self.self_values, self.cross_keys, self.cross_values):
            caches[:] = [c.index_select(0, index) for c in caches]
        if self.adapters is not None:
            self.adapters = [self.adapters[i] for i in index.tolist()]


def _is_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A")  # peft's LoraLayer, without importing peft for plain models


class Network:
    """One (possibly LoRA-adapted) Whisper model's forward passes for decoding."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        self.encoder, self.decoder, self.proj_out = base.model.encoder, base.model.decoder, base.proj_out
        self.layers = list(self.decoder.layers)
        attention = self.layers[0].self_attn
        self.heads, self.head_dim = attention.num_heads, attention.head_dim
        encoder_attention = self.encoder.layers[0].self_attn
        self.encoder_heads = encoder_attention.num_heads

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    @property
    def vocab_size(self) -> int:
        return self.proj_out.out_features

    @staticmethod
    def linear(module: torch.nn.Module, x: torch.Tensor, adapters: list[str] | None) -> torch.Tensor:
        """`module(x)`: LoRA layers with the rows' adapters, plain Linear layers as `weight @ x.T`."""
        if _is_lora(module):
            return Network._lora(module, x, adapters)
        if type(module) is not torch.nn.Linear:
            return module(x)
        rows = x.reshape(-1, x.shape[-1])
        count = len(rows)
        if count > FEW_ROWS:  # many rows (the encoder, a prompt): the usual layout is the faster one
            return module(x)
        if count == 1:  # one row would take the slower matrix-vector path
            rows = torch.cat([rows, rows])
        if module.bias is None:
            out = module.weight @ rows.T
        else:
            out = torch.addmm(module.bias[:, None], module.weight, rows.T)
        return out.T[:count].contiguous().view(*x.shape[:-1], -1)

    @staticmethod
    def _lora(module, x: torch.Tensor, adapters: list[str] | None) -> torch.Tensor:
        """A peft LoRA layer, computed as peft computes it (base output + B(A(x)) * scaling per adapter, rows
        of other adapters untouched) but with the base layer on the fast path above: for the few rows of a
        decoding step peft's forward costs more in Python than in arithmetic, and it is called ~100 times a
        step. Variants (DoRA, AdaLoRA), merged or disabled layers go through peft itself."""
        names = module.active_adapters if adapters is None else adapters
        wanted = {name for name in names if name != BASE_ROWS and name in module.lora_A}
        variants = getattr(module, "lora_variant", {})
        plain = all(isinstance(module.lora_A[name], torch.nn.Linear) and name not in variants for name in wanted)
        if module.merged or module.disable_adapters or not plain:  # AdaLoRA keeps bare parameters, DoRA a variant
            return module(x) if adapters is None else module(x, adapter_names=adapters)
        out = Network.linear(module.base_layer, x, None)
        for name in wanted:
            lora_a, lora_b, scale = module.lora_A[name], module.lora_B[name], module.scaling[name]
            dropout = module.lora_dropout[name]
            # peft keeps adapters in float32 over a float16/bfloat16 base (autocast_adapter_dtype): the
            # low-rank product runs in the adapter's precision and is added in the base's, as peft does
            def delta(rows_in: torch.Tensor) -> torch.Tensor:
                return (lora_b(lora_a(dropout(rows_in.to(lora_a.weight.dtype)))) * scale).to(out.dtype)

            if adapters is None:
                out = out + delta(x)
            else:
                rows = torch.tensor([i for i, n in enumerate(adapters) if n == name], device=x.device)
                out[rows] += delta(x[rows])
        return out

    def _split_heads(self, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        heads = heads or self.heads
        return x.view(x.shape[0], x.shape[1], heads, x.shape[-1] // heads).transpose(1, 2)

    # ---- encoder --------------------------------------------------------------------------------------

    def encode(self, features: torch.Tensor, adapters: list[str] | None = None) -> torch.Tensor:
        """(batch, n_mels, 3000) log-mel -> (batch, 1500, d_model), as transformers' WhisperEncoder computes it."""
        encoder, linear = self.encoder, self.linear
        x = F.gelu(linear(encoder.conv1, features, adapters))
        x = F.gelu(linear(encoder.conv2, x, adapters)).permute(0, 2, 1)
        hidden = x + encoder.embed_positions.weight[: x.shape[1]]
        for layer in encoder.layers:
            attention = layer.self_attn
            x = layer.self_attn_layer_norm(hidden)
            q = self._split_heads(linear(attention.q_proj, x, adapters) * attention.scaling, self.encoder_heads)
            k = self._split_heads(linear(attention.k_proj, x, adapters), self.encoder_heads)
            v = self._split_heads(linear(attention.v_proj, x, adapters), self.encoder_heads)
            x = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(hidden.shape)
            hidden = hidden + linear(attention.out_proj, x, adapters)
            x = layer.activation_fn(linear(layer.fc1, layer.final_layer_norm(hidden), adapters))
            hidden = hidden + linear(layer.fc2, x, adapters)
            if hidden.dtype == torch.float16:  # transformers clamps here too, against fp16 overflow
                limit = torch.finfo(hidden.dtype).max - 1000
                hidden = hidden.clamp(-limit, limit)
        return encoder.layer_norm(hidden)

    # ---- decoder --------------------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, d_model) -> (rows, vocabulary), in float32."""
        return self.linear(self.proj_out, hidden, None).float()

    def start(self, ids: torch.Tensor, encoded: torch.Tensor, max_length: int, adapters: list[str] | None = None,
              alignment_heads: dict[int, list[int]] | None = None) -> tuple[Caches, torch.Tensor]:
        """Run the prompt `ids` (batch, tokens); returns the caches and the hidden states of every prompt
        token. With `alignment_heads` ({layer: [head, …]}) the caches also carry those heads'
        cross-attention weights over the encoder frames, `caches.attention` (rows, heads, tokens, frames)."""
        batch = ids.shape[0]
        shape = (batch, self.heads, max_length, self.head_dim)
        # Cross-attention keys are kept transposed, (batch, heads, head_dim, frames): a plain `q @ keys`
        # then reads them in order, faster than the fused attention kernel does for one query token.
        linear = self.linear
        caches = Caches([encoded.new_empty(shape) for _ in self.layers], [encoded.new_empty(shape) for _ in self.layers],
                        [self._split_heads(linear(layer.encoder_attn.k_proj, encoded, adapters)).transpose(-1, -2)
                         .contiguous() for layer in self.layers],
                        # contiguous per head: `weights @ values` then reads them in place instead of
                        # copying 3 MB per row, layer and step into bmm's layout
                        [self._split_heads(linear(layer.encoder_attn.v_proj, encoded, adapters)).contiguous()
                         for layer in self.layers],
                        adapters)
        return caches, self._run(ids, caches, alignment_heads)

    def step(self, ids: torch.Tensor, caches: Caches, alignment_heads: dict[int, list[int]] | None = None
             ) -> torch.Tensor:
        """One more token per row (batch, 1) -> its hidden state (batch, d_model); with `alignment_heads`,
        `caches.attention` holds their cross-attention for it (rows, heads, 1, frames)."""
        return self._run(ids, caches, alignment_heads)[:, -1]

    def _run(self, ids: torch.Tensor, caches: Caches, alignment_heads: dict[int, list[int]] | None = None) -> torch.Tensor:
        start, count = caches.length, ids.shape[1]
        end = start + count
        hidden = self.decoder.embed_tokens(ids) + self.decoder.embed_positions.weight[start:end]
        linear, adapters = self.linear, caches.adapters
        captured = []
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            x = layer.self_attn_layer_norm(hidden)
            q = self._split_heads(linear(attention.q_proj, x, adapters) * attention.scaling)
            caches.self_keys[i][:, :, start:end] = self._split_heads(linear(attention.k_proj, x, adapters))
            caches.self_values[i][:, :, start:end] = self._split_heads(linear(attention.v_proj, x, adapters))
            x = F.scaled_dot_product_attention(q, caches.self_keys[i][:, :, :end], caches.self_values[i][:, :, :end],
                                               is_causal=count > 1, scale=1.0)
            hidden = hidden + linear(attention.out_proj, x.transpose(1, 2).reshape(hidden.shape), adapters)
            attention = layer.encoder_attn
            x = layer.encoder_attn_layer_norm(hidden)
            q = self._split_heads(linear(attention.q_proj, x, adapters) * attention.scaling)
            weights = (q @ caches.cross_keys[i]).softmax(-1)
            if alignment_heads and i in alignment_heads:
                captured.append(weights[:, alignment_heads[i]].float())
            x = weights @ caches.cross_values[i]
            hidden = hidden + linear(attention.out_proj, x.transpose(1, 2).reshape(hidden.shape), adapters)
            x = layer.activation_fn(linear(layer.fc1, layer.final_layer_norm(hidden), adapters))
            hidden = hidden + linear(layer.fc2, x, adapters)
        caches.length = end
        if alignment_heads:
            caches.attention = torch.cat(captured, 1)
        return self.decoder.layer_norm(hidden)
