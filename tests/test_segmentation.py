"""train/segmentation.py: label maps that sum to one and match the objects, a loss that is
lowest on the right answer, and the recorder on a real U-Net."""

from dataclasses import replace

import pytest
import torch

from train.segmentation import N_COLOUR, N_SHAPE, Segmentation, label_maps, record_features
from train.shapes import COLORS, SHAPES, ObjectSpec, SceneSpec, make_dataset

# Two squares filling whole cells of an 8 x 8 grid: their maps are exactly 0 / 1 there.
LEFT = ObjectSpec("red", "square", "small", "left", center=(0.25, 0.5), extent=0.25)
RIGHT = ObjectSpec("blue", "circle", "small", "right", center=(0.75, 0.5), extent=0.25)
SCENE = SceneSpec((LEFT, RIGHT), "left_of", "gray")


def test_label_maps_are_distributions_with_each_object_in_its_place():
    maps = label_maps(SCENE, 8)
    assert maps.shape == (N_SHAPE + N_COLOUR, 8, 8)
    torch.testing.assert_close(maps[:N_SHAPE].sum(0), torch.ones(8, 8))
    torch.testing.assert_close(maps[N_SHAPE:].sum(0), torch.ones(8, 8))
    square, red = 1 + SHAPES.index("square"), N_SHAPE + 1 + list(COLORS).index("red")
    assert torch.equal(maps[square, 3:5, 1:3], torch.ones(2, 2))  # the left square, exactly
    assert torch.equal(maps[red], maps[square])
    circle, blue = 1 + SHAPES.index("circle"), N_SHAPE + 1 + list(COLORS).index("blue")
    assert maps[circle, :, :4].sum() == 0 and 0 < maps[circle, 4, 5] <= 1  # soft at the edge
    torch.testing.assert_close(maps[blue], maps[circle])
    assert maps[0, 0, 0] == 1 and maps[N_SHAPE, 0, 0] == 1  # background


def test_the_loss_is_lowest_on_the_right_labels_and_counts_only_captioned_low_noise(tmp_path):
    folder = make_dataset(tmp_path / "d", 6, seed=3, size=32)
    seg = Segmentation(folder, channels=N_SHAPE + N_COLOUR, t_max=800)
    with torch.no_grad():  # an identity head: the features are the logits
        seg.head.weight.copy_(torch.eye(N_SHAPE + N_COLOUR)[..., None, None])
        seg.head.bias.zero_()
    names = sorted(seg.scenes)[:2]
    right = torch.stack([seg.targets(n, 8) for n in names])
    captions, t = ["x", "y"], torch.tensor([0, 10])
    best = seg(torch.log(right.clamp_min(1e-6)), names, captions, t)
    # every pixel's share moved to the next class (background -> the first shape / colour)
    shifted = torch.cat([right[:, :N_SHAPE].roll(1, 1), right[:, N_SHAPE:].roll(1, 1)], 1)
    wrong = seg(torch.log(shifted.clamp_min(1e-6)), names, captions, t)
    flat = seg(torch.zeros_like(right), names, captions, t)
    assert best < flat < wrong
    assert seg(right, names, ["", ""], t) is None  # dropped captions name nothing
    assert seg(right, names, captions, torch.tensor([800, 999])) is None
    with pytest.raises(ValueError, match="square"):
        seg(right[..., :4], names, captions, t)


def test_the_recorder_sees_the_last_feature_map_and_changes_nothing():
    from ldm.unet import UNET_PRESETS, UNet

    torch.manual_seed(0)
    unet = UNet(replace(UNET_PRESETS["tiny"], sample_size=8)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    context = torch.randn(2, 7, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(x, t, context)
        with record_features(unet) as features:
            recorded = unet(x, t, context)
        unet(x, t, context)
    assert torch.equal(plain, recorded) and len(features) == 1
    assert features[0].shape == (2, unet.conv_norm_out.num_channels, 8, 8)
