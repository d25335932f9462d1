"""VisionLanguageModel: vision tower + projector + decoder LM, composed (LLaVA's layout).

The parts keep Hugging Face LLaVA's names (`vision_tower`, `multi_modal_projector`,
`language_model`). Each image placeholder in the token ids is expanded beforehand into
`cfg.image_tokens` slots holding `image_token_id`; `embed_inputs` overwrites exactly those
slots with projected patch tokens, in reading order, and refuses any count mismatch.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import VLMConfig
from vlmkit.models.decoder import DecoderLM, KVCache
from vlmkit.models.projector import Projector
from vlmkit.models.vit import VisionTransformer


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.image_token_id < 0:
            raise ValueError("VLMConfig.image_token_id is unset; take it from the tokenizer (tokenizer.image_id)")
        self.cfg = cfg
        self.image_token_id = cfg.image_token_id
        self.vision_tower = VisionTransformer(cfg.vision)
        self.multi_modal_projector = Projector(cfg.projector, cfg.vision.width, cfg.decoder.width, cfg.image_tokens)
        self.language_model = DecoderLM(cfg.decoder)

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [n_images, 3, H, W] -> the tower tokens the projector reads [n_images, N, D_vision]."""
        tokens = self.vision_tower(pixels, layer=self.cfg.vision_layer)  # [n, prefix + N, Dv]
        if self.cfg.vision_select == "patch":
            tokens = tokens[:, self.vision_tower.prefix:]
        return tokens

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [n_images, 3, H, W] -> LM-space image tokens [n_images, K, D_lm]."""
        return self.multi_modal_projector(self.vision_tokens(pixels))

    def embed_inputs(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None,
                     vision_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with every image slot filled by an image token.

        The images come as `pixels`, as `vision_tokens` (a frozen tower's output, computed
        once and cached by training) or as finished `image_features`.
        """
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        if image_features is None and vision_tokens is not None and len(vision_tokens):
            image_features = self.multi_modal_projector(vision_tokens)
        elif image_features is None and pixels is not None and len(pixels):
            image_features = self.image_features(pixels)
        n_images = 0 if image_features is None else image_features.shape[0]
        K = self.cfg.image_tokens
        if n_slots != n_images * K:
            raise ValueError(f"image placeholders and images do not match: the tokens hold {n_slots} image "
                             f"slots ({n_slots / K:g} images of {K} tokens) but {n_images} images were given")
        # The image token may lie past the LM's vocabulary (it is added to a pretrained
        # tokenizer); its slots are overwritten, so look up any valid id there.
        embeds = self.language_model.embed(input_ids.masked_fill(slots, 0))
        if n_images:
            feats = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats)
        return embeds

    def shared_image_positions(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                               cache: KVCache | None) -> torch.Tensor:
        """`positions` (default: counting on from the cache) with each image's tokens set to its first one's."""
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        slots = input_ids == self.image_token_id
        first = slots & ((slots.cumsum(1) - 1) % self.cfg.image_tokens == 0)   # each image's first slot
        # Each position's latest image start (-1 before any), carried forward along the row.
        image_start = torch.where(first, positions, torch.full_like(positions, -1)).cummax(1).values
        return torch.where(slots, image_start, positions)

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, vision_tokens: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                last_only: bool = False, logits_at: torch.Tensor | None = None,
                attentions: list | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]; with `logits_at` (bool [B, T]) only there, as [n, vocab].

        Training asks for the answer positions only: the vocabulary projection is the
        largest matrix product of a small LM, and prompt and image positions need none.
        """
        embeds = self.embed_inputs(input_ids, pixels, image_features, vision_tokens)
        lm = self.language_model
        if self.cfg.image_positions == "shared":
            positions = self.shared_image_positions(input_ids, positions, cache)
        if logits_at is None:
            return lm(embeds=embeds, positions=positions, cache=cache, key_mask=key_mask,
                      last_only=last_only, attentions=attentions)
        hidden = lm(embeds=embeds, positions=positions, cache=cache, key_mask=key_mask,
                    return_hidden=True, attentions=attentions)
        return lm.lm_head(hidden[logits_at])
