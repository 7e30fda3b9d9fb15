"""Concept bank: per concept, a FIFO of the newest teacher projections (stage 2)."""
from __future__ import annotations

import torch

from utils.errors import UserError


class ConceptBank:
    """K ring buffers of ``capacity`` vectors of width ``dim``, held in one (K, capacity, dim) tensor.

    ``head[k]`` is the slot the next vector of concept k goes to and ``fill[k]`` how many slots
    hold data, so concept k's entries, oldest to newest, are slots (head - fill + j) % capacity.
    """

    def __init__(self, num_concepts: int, dim: int, capacity: int = 100,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.num_concepts, self.dim, self.capacity = num_concepts, dim, capacity
        self.vectors = torch.zeros(num_concepts, capacity, dim, device=device, dtype=dtype)  # (K, cap, p)
        self.head = torch.zeros(num_concepts, dtype=torch.long, device=device)  # (K,)
        self.fill = torch.zeros(num_concepts, dtype=torch.long, device=device)  # (K,)

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    def __len__(self) -> int:
        return int(self.fill.sum())

    def update(self, index: torch.Tensor, vectors: torch.Tensor, keep_ratio: float = 0.5,
               generator: torch.Generator | None = None) -> None:
        """Append, per concept present in ``index`` (B, n), a random floor(count * keep_ratio) of its
        ``vectors`` (B, n, p) in random order; each concept then keeps its newest ``capacity``.

        The random choice is one permutation of all B * n vectors: a concept keeps its members
        with the lowest ranks in it, appended in rank order.  Same inputs + same generator state
        give the same bank on every process.
        """
        if vectors.shape[:-1] != index.shape or vectors.shape[-1] != self.dim:
            raise UserError(f"bank update expects index (B, n) and vectors (B, n, {self.dim}), got "
                            f"{tuple(index.shape)} and {tuple(vectors.shape)}")
        idx = index.reshape(-1).to(self.device)  # (L,)
        vec = vectors.detach().reshape(-1, self.dim)  # (L, p)
        L, K, cap = idx.numel(), self.num_concepts, self.capacity
        rng_device = generator.device if generator is not None else self.device
        priority = torch.randperm(L, generator=generator, device=rng_device).to(self.device)  # (L,)
        order = (idx * L + priority).argsort()  # (L,) grouped by concept, by priority inside
        concept = idx[order]  # (L,) non-decreasing
        counts = torch.bincount(idx, minlength=K)  # (K,)
        if counts.numel() != K:
            raise UserError(f"bank update got a concept index >= num_concepts ({K})")
        keep = (counts.double() * keep_ratio).long()  # (K,) Python's int(count * ratio)
        start = counts.cumsum(0) - counts  # (K,) first position of each concept in `order`
        rank = torch.arange(L, device=self.device) - start[concept]  # (L,) append order in concept
        # Of the kept ranks [0, keep), only the newest `cap` survive; they land on distinct slots.
        write = (rank < keep[concept]) & (rank >= keep[concept] - cap)  # (L,)
        c, r = concept[write], rank[write]
        self.vectors[c, (self.head[c] + r) % cap] = vec[order[write].to(vec.device)].to(self.vectors)
        self.head = (self.head + keep) % cap
        self.fill = (self.fill + keep).clamp(max=cap)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored vectors, concept-major and oldest to newest: (index (M,), vectors (M, p))."""
        K, cap = self.num_concepts, self.capacity
        j = torch.arange(cap, device=self.device)  # (cap,)
        valid = j < self.fill.unsqueeze(1)  # (K, cap)
        slot = (self.head.unsqueeze(1) - self.fill.unsqueeze(1) + j) % cap  # (K, cap) oldest first
        concept = torch.arange(K, device=self.device).unsqueeze(1).expand(K, cap)  # (K, cap)
        flat = (concept * cap + slot)[valid]  # (M,)
        return concept[valid], self.vectors.view(K * cap, self.dim).index_select(0, flat)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What resuming needs: the stored vectors (M, p) as `entries` orders them, each concept's count
        (K,) and the capacity; the empty slots (most of a young bank) are not saved."""
        return {"capacity": torch.tensor(self.capacity), "fill": self.fill.clone(), "vectors": self.entries()[1]}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the FIFOs of `state_dict` (each concept's oldest entry in slot 0): same `entries`, same updates."""
        missing = [name for name in ("capacity", "fill", "vectors") if name not in state]
        if missing:
            raise UserError(f"concept bank state lacks {', '.join(missing)}")
        fill, vectors = state["fill"].to(self.device), state["vectors"]
        if int(state["capacity"]) != self.capacity or fill.shape != self.fill.shape or \
                bool(((fill < 0) | (fill > self.capacity)).any()):
            raise UserError(f"concept bank state holds {tuple(fill.shape)} concepts of capacity "
                            f"{int(state['capacity'])}; this bank has ({self.num_concepts},) of {self.capacity}")
        if vectors.shape != (int(fill.sum()), self.dim):
            raise UserError(f"concept bank state 'vectors' must have shape ({int(fill.sum())}, {self.dim}), "
                            f"got {tuple(vectors.shape)}")
        used = torch.arange(self.capacity, device=self.device) < fill.unsqueeze(1)  # (K, cap), concept-major
        self.vectors.zero_()
        self.vectors[used] = vectors.to(self.vectors)
        self.fill, self.head = fill.clone(), fill % self.capacity

    def to(self, device: torch.device | str) -> "ConceptBank":
        self.vectors, self.head, self.fill = self.vectors.to(device), self.head.to(device), self.fill.to(device)
        return self
