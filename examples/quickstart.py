"""Quick start: train only the singular values of a torchvision ResNet-50, then merge back to a plain model.

Runs offline on a laptop CPU in about a minute: random-init weights (no download) and generated data.

    python examples/quickstart.py --steps 5 --batch-size 4 --image-size 224
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import svftune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="SGD steps on generated data")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.image_size < 32:
        parser.error("--steps and --batch-size must be >= 1 and --image-size >= 32")

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet50(num_classes=10)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    # Random weights stand in for a pretrained backbone (nothing is downloaded); give its BatchNorm layers
    # statistics of the data first, as pretraining would have, since SVF keeps them frozen.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(images)
    start = time.perf_counter()
    svftune.apply_svf(model, layers=["layer2", "layer3", "layer4"])
    print(f"apply_svf (decompose layers 2-4): {time.perf_counter() - start:.2f} s")
    model.fc.requires_grad_(True)  # a new task head trains as usual
    svftune.print_trainable_parameters(model)

    singular_values = [p for n, p in model.named_parameters() if n.endswith(".S")]
    head = list(model.fc.parameters())
    optimizer = torch.optim.SGD(
        [{"params": head}, {"params": singular_values, "lr": args.lr / 10}], lr=args.lr, momentum=0.9
    )
    model.train()
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}, {times[-1]:.2f} s")
    median = sorted(times)[len(times) // 2]
    print(f"training speed: {args.batch_size / median:.1f} images/s (median step {median:.2f} s)")

    model.eval()
    with torch.no_grad():
        adapted = model(images)
        svftune.merge_svf(model)
        merged = model(images)
    relative = ((merged - adapted).norm() / adapted.norm()).item()
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    print(f"merged into a plain model ({', '.join(sorted(kinds))} layers only)")
    print(f"merged vs unmerged output: relative difference {relative:.2e} (tolerance 1e-5)")
    if relative > 1e-5:
        raise SystemExit("merged output differs from the adapted model: please report this")


if __name__ == "__main__":
    main()
