"""Bidirectional encoder: BERT, DistilBERT, RoBERTa and MiniLM, chosen by `ModelConfig`.

Post-norm blocks over word + position (+ token-type) embeddings and a norm. Heads by `config.head`:
"lm" a masked-LM head (dense -> act -> norm -> vocab projection tied to the embeddings, with a bias),
"classify" a sequence-classification head on the first token (dense -> tanh/relu -> labels), "none".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.blocks import Block, ModelOutput, activation, check_input_ids, init_weights, make_norm


class MLMHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = make_norm(config)
        self.decoder = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(activation(self.activation, self.dense(x))))


class ClassificationHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.cls_activation
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.d_model, config.n_labels)

    def forward(self, first_token: Tensor) -> Tensor:
        x = self.dense(self.dropout(first_token))
        x = torch.tanh(x) if self.activation == "tanh" else torch.relu(x)
        return self.out(self.dropout(x))


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "encoder":
            raise ValueError(f"Encoder needs a config with arch='encoder', got {config.arch!r}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        self.embed_types = nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        self.embed_norm = make_norm(config) if config.embed_norm else None
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.mlm_head = MLMHead(config) if config.head == "lm" else None
        self.cls_head = ClassificationHead(config) if config.head == "classify" else None
        self.pooler = nn.Linear(config.d_model, config.d_model) if config.pooler else None
        init_weights(self)
        if self.mlm_head is not None and config.tie_embeddings:
            self.mlm_head.decoder.weight = self.embed_tokens.weight

    def pool(self, last_hidden_state: Tensor) -> Tensor:
        """BERT's pooled output (B, C): tanh(pooler(first token)). Raises ValueError without a pooler."""
        if self.pooler is None:
            raise ValueError("this encoder has no pooler (config.pooler is False)")
        return torch.tanh(self.pooler(last_hidden_state[:, 0]))

    def positions(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Position ids (B, T): 0.. for BERT; RoBERTa counts real tokens from offset, padding gets offset - 1."""
        B, T = input_ids.shape
        offset = self.config.position_offset
        if offset == 0:
            return torch.arange(T, device=input_ids.device).expand(B, T)
        real = input_ids.ne(self.config.pad_token_id).long()
        return torch.cumsum(real, dim=1) * real + (offset - 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, output_hidden_states: bool = False) -> ModelOutput:
        """Logits for input_ids (B, T): (B, T, vocab) with the MLM head, (B, n_labels) with the classifier.

        attention_mask: (B, T), 1 for real tokens, 0 for padding. token_type_ids: (B, T) segment ids.
        Raises ValueError for ids outside the vocabulary or sequences longer than the position table.
        """
        cfg = self.config
        check_input_ids(input_ids, cfg.vocab_size)
        B, T = input_ids.shape
        if T + cfg.position_offset > cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model context of "
                             f"{cfg.max_seq_len - cfg.position_offset}")
        if position_ids is None:
            position_ids = self.positions(input_ids, attention_mask)
        x = self.embed_tokens(input_ids) + self.embed_positions(position_ids)  # (B, T, C)
        if self.embed_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.embed_types(token_type_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)

        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask, False, None)
            if hidden is not None:
                hidden.append(x)
        if self.mlm_head is not None:
            logits = self.mlm_head(x)
        elif self.cls_head is not None:
            logits = self.cls_head(x[:, 0])
        else:
            logits = None
        return ModelOutput(logits=logits, last_hidden_state=x, hidden_states=hidden)
