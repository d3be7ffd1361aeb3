"""Training the demo classifier (GAIA-layout CIFAR ResNet-18 on the demo digits).

Fixed seed, SGD with momentum and a one-cycle schedule, random 2-pixel shifts; the
checkpoint is a bare state dict, so it loads like the authors' releases.
"""
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

EPOCHS = 3
BATCH = 64


def train_classifier(model, train_set, epochs=EPOCHS, seed=0):
    """Train ``model`` in place on ``train_set`` (items ``(x, y, index, reason)``); returns seconds."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=epochs * len(loader))
    model.train()
    start = time.time()
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"train epoch {epoch + 1}/{epochs}", unit="batch")
        for x, y, _, _ in bar:
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return time.time() - start


@torch.no_grad()
def accuracy(model, dataset, batch_size=256):
    """Top-1 accuracy of ``model`` on ``dataset`` (items ``(x, y, index, reason)``), in [0, 1]."""
    model.eval()
    correct = total = 0
    for x, y, _, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)
