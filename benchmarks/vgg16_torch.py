"""The PyTorch side of train_step_vs_torch.py: the same DeeperCluster step in plain torch.

VGG-16-BN (the layer table of ``deeper_jax.models.architectures``, the same inits), the
heads V and W, eq. 5 with W's gradient × S (``sub_head_grad='per_group'``), SGD with
momentum and coupled weight decay, and the training view done inside the step
(torchvision's RandomResizedCrop box draw, flip, the slice's rotation). torchvision
does not install beside the torch 2.13.0 CPU wheel, so the crop is written here. The
recipe's constants are shared with the JAX side, which imports them from here.
"""
from __future__ import annotations

import math

import numpy as np

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_ROTATIONS = 4
CROP_SCALE, CROP_RATIO, CROP_ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-5


def _crop_box(gen, height: int, width: int) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params with torch's RNG: (top, left, h, w)."""
  import torch

  area = height * width
  log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
  for _ in range(CROP_ATTEMPTS):
    u = torch.rand(2, generator=gen).tolist()
    target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[0])
    aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
      left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < CROP_RATIO[0]:
    w, h = width, round(width / CROP_RATIO[0])
  elif in_ratio > CROP_RATIO[1]:
    w, h = round(height * CROP_RATIO[1]), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def torch_training_view(images, size: int, gen):
  """uint8 [S, b, L, L, C] → float [S·b, C, size, size]: crop, resize, flip, rotate."""
  import torch
  import torch.nn.functional as F

  num_s, b = images.shape[:2]
  x = images.reshape((num_s * b,) + images.shape[2:]).permute(0, 3, 1, 2).float() / 255.0
  views = []
  for image in x:
    top, left, h, w = _crop_box(gen, image.shape[-2], image.shape[-1])
    crop = image[None, :, top:top + h, left:left + w]
    views.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True))
  x = torch.cat(views)
  flip = torch.rand(len(x), generator=gen) < 0.5
  x = torch.where(flip[:, None, None, None], x.flip(-1), x)
  x = x.view(num_s, b, *x.shape[1:])
  x = torch.stack([torch.rot90(x[s], s % NUM_ROTATIONS, dims=(-2, -1)) for s in range(num_s)])
  return x.reshape((num_s * b,) + x.shape[2:])


class TorchNet:
  """VGG-16-BN + heads V, W and the eq. 5 step, as deeper_jax's, in torch.nn."""

  def __init__(self, args, size: int, channels_last: bool):
    import torch
    from torch import nn

    from deeper_jax.models.architectures import vgg16_bn_stages
    from deeper_jax.models.sobel import SOBEL_X, SOBEL_Y

    self.torch, self.size, self.sobel = torch, size, args.sobel
    self.num_super = NUM_ROTATIONS * args.num_super_clusters
    layers, c, side = [], (2 if args.sobel else 3), size
    for i, stage in enumerate(vgg16_bn_stages(args.width)):
      for j, spec in enumerate(stage.convs):
        padding = 0 if (args.sobel and i == j == 0) else spec.padding
        conv = nn.Conv2d(c, spec.features, spec.kernel, spec.stride, padding)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (spec.kernel ** 2 * spec.features)))
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(spec.features, eps=1e-5, momentum=0.1), nn.ReLU(True)]
        c = spec.features
      layers.append(nn.MaxPool2d(*stage.pool))
      side //= stage.pool[1]
    d = args.feature_dim
    # nn.Linear's default init is U(±1/√fan_in) for weight and bias: fc_init='torch'.
    layers += [nn.Flatten(), nn.Linear(c * side * side, d), nn.ReLU(True), nn.Dropout(0.5),
               nn.Linear(d, d)]
    bound = 1.0 / math.sqrt(d)
    uniform = lambda *shape: nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
    self.heads = nn.ParameterDict({
        "V_kernel": uniform(d, self.num_super), "V_bias": uniform(self.num_super),
        "W_kernel": uniform(self.num_super, d, args.num_sub_clusters),
        "W_bias": uniform(self.num_super, args.num_sub_clusters)})
    self.format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = nn.Sequential(*layers).to(memory_format=self.format)
    self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    self.std = torch.tensor(STD).view(1, 3, 1, 1)
    self.sobel_kernel = torch.from_numpy(np.stack([SOBEL_X, SOBEL_Y])[:, None])
    self.opt = torch.optim.SGD(list(self.model.parameters()) + list(self.heads.parameters()),
                               lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

  def param_count(self) -> int:
    return sum(p.numel() for p in self.model.parameters()) + sum(
        p.numel() for p in self.heads.parameters())

  def loss(self, x, sub_labels):
    torch, F = self.torch, self.torch.nn.functional
    x = (x - self.mean) / self.std
    if self.sobel:  # grayscale, zero-pad by conv1_1's padding + 1, VALID Sobel pair
      x = F.conv2d(x.mean(dim=1, keepdim=True), self.sobel_kernel, padding=2)
    features = self.model(x.contiguous(memory_format=self.format))
    num_s, b = sub_labels.shape
    f = torch.relu(features).view(num_s, b, -1)
    h = self.heads
    super_logits = f @ h["V_kernel"] + h["V_bias"]
    super_targets = torch.arange(num_s)[:, None].expand(num_s, b)
    sub_logits = torch.bmm(f, h["W_kernel"]) + h["W_bias"][:, None, :]
    super_loss = F.cross_entropy(super_logits.reshape(num_s * b, -1), super_targets.reshape(-1))
    sub_loss = F.cross_entropy(sub_logits.reshape(num_s * b, -1), sub_labels.reshape(-1))
    with torch.no_grad():  # the metrics deeper_jax's step returns
      accuracies = ((super_logits.argmax(-1) == super_targets).float().mean(),
                    (sub_logits.argmax(-1) == sub_labels).float().mean())
    return super_loss + sub_loss, accuracies

  def step_fn(self, images, sub_labels):
    """(run, sync) of one step on the fixed uint8 images [S, b, L, L, 3] and sub-labels [S, b]."""
    torch = self.torch
    images, sub_labels = torch.from_numpy(images), torch.from_numpy(sub_labels)
    sub_labels = sub_labels.long()
    gen = torch.Generator().manual_seed(0)
    self.model.train()

    def run():
      x = torch_training_view(images, self.size, gen)
      loss, _ = self.loss(x, sub_labels)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      for name in ("W_kernel", "W_bias"):  # sub_head_grad='per_group'
        self.heads[name].grad.mul_(self.num_super)
      self.opt.step()
      return loss

    return run, lambda loss: float(loss.detach())
