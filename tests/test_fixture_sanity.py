def test_tiny_checkpoint_learns_the_patterns(tiny_checkpoint, pattern_data):
    import torch

    from deqguard.models import load_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint, device="cpu")
    x, y = (torch.from_numpy(a) for a in pattern_data)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9
    assert abs(acc - meta.metrics["train_clean_accuracy"]) < 1e-6
