"""A ViT written from plain torch.nn parts, with its own attribute names: no timm, no
`attn`/`mlp`/`blocks` naming. evoplug must find its blocks by what they compute."""
import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self, width, heads, batch_first=True):
        super().__init__()
        self.pre_a = nn.LayerNorm(width)
        self.mixer = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.pre_b = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.batch_first = batch_first

    def forward(self, tokens):
        h = self.pre_a(tokens)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.mixer(h, h, h, need_weights=False)[0]
        if not self.batch_first:
            h = h.transpose(0, 1)
        tokens = tokens + h
        return tokens + self.ff(self.pre_b(tokens))


class PlainViT(nn.Module):
    def __init__(self, img=32, patch=4, width=64, heads=4, depth=6, classes=10, batch_first=True):
        super().__init__()
        self.embed = nn.Conv2d(3, width, patch, patch)
        self.summary = nn.Parameter(torch.zeros(1, 1, width))
        self.where = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, width) * 0.02)
        self.trunk = nn.ModuleList([Layer(width, heads, batch_first) for _ in range(depth)])
        self.final = nn.LayerNorm(width)
        self.classify = nn.Linear(width, classes)
        self.img = img

    def forward(self, images):
        t = self.embed(images).flatten(2).transpose(1, 2)
        t = torch.cat([self.summary.expand(t.shape[0], -1, -1), t], 1) + self.where
        for layer in self.trunk:
            t = layer(t)
        return self.classify(self.final(t)[:, 0])


class RecordingViT(PlainViT):
    """:class:`PlainViT` that keeps each layer's output in a list attribute, as kornia's ViT
    encoder does (``encoder.results``): after a forward with autograd on, the list holds tensors
    with autograd history, which ``copy.deepcopy`` refuses."""

    def forward(self, images):
        t = self.embed(images).flatten(2).transpose(1, 2)
        t = torch.cat([self.summary.expand(t.shape[0], -1, -1), t], 1) + self.where
        self.results = []
        for layer in self.trunk:
            t = layer(t)
            self.results.append(t)
        return self.classify(self.final(t)[:, 0])
