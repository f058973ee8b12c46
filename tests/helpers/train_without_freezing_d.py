"""Negative control for freezing D in the G step: the real trainer, except that
`set_requires_grad(D, False)` does nothing, so G's loss leaves gradients in D's
parameters. ZeRO-2's gradient hooks then reduce D's gradients twice and the engine fails
("Gradient computed twice"). (Under ZeRO-1 the step's zero_grad before D's backward clears
them: wasted work, but no leak with pipeline/gan.py's order.)"""
from pipeline import gan, train

freeze_or_unfreeze = gan.set_requires_grad


def set_requires_grad_never_freezing(model, flag: bool) -> None:
    if flag:
        freeze_or_unfreeze(model, flag)


gan.set_requires_grad = set_requires_grad_never_freezing

if __name__ == "__main__":
    train.run_and_exit()
