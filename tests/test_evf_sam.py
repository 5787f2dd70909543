"""EVF-SAM backend: published key layout, strict loading, pre/post-processing and the segmenter contract."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sentencepiece")

from cgpo_trl.saliency.segmenters import load_segmenter  # noqa: E402
from cgpo_trl.saliency.segmenters.evf import (  # noqa: E402
    EvfSam2Model,
    EvfSamConfig,
    EvfSamModel,
    EvfTokenizer,
    build_model,
    from_pretrained,
)
from cgpo_trl.saliency.segmenters.evf.keys import SAM1_KEYS, SAM2_KEYS  # noqa: E402
from cgpo_trl.saliency.segmenters.evf.model import load_weights  # noqa: E402
from cgpo_trl.saliency.segmenters.evf.processing import (  # noqa: E402
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    beit3_pixels,
    resized_shape,
    sam2_pixels,
    sam_pixels,
    upsample_logits,
    upsample_logits_sam2,
)
from cgpo_trl.saliency.segmenters.evf.tiny import TINY_CONFIG, TINY_SAM2_CONFIG, save_tiny_checkpoint  # noqa: E402
from cgpo_trl.saliency.segmenters.evf_sam import DTYPES, EvfSamSegmenter  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PUBLISHED_CONFIG = {  # config.json of YxZhang/evf-sam, fields that matter
    "architectures": ["EvfSamModel"],
    "hidden_size": 1024,
    "mm_extractor_scale": "large",
    "model_type": "evf",
    "out_dim": 256,
    "sam_scale": "huge",
    "torch_dtype": "float16",
}


def read_key_fixture(name: str) -> set[tuple[str, str]]:
    """Expand the fixture's "{0-6,8}" layer ranges into (key, shape) pairs."""
    keys = set()
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as handle:
        for line in handle:
            if not line.strip() or line.startswith("#"):
                continue
            key, shape = line.split()
            match = re.fullmatch(r"(.*)\{([\d,\-]+)\}(.*)", key)
            if not match:
                keys.add((key, shape))
                continue
            for span in match[2].split(","):
                first, _, last = span.partition("-")
                keys.update((f"{match[1]}{i}{match[3]}", shape) for i in range(int(first), int(last or first) + 1))
    return keys


def key_set(state_dict) -> set[tuple[str, str]]:
    return {(key, "x".join(map(str, value.shape))) for key, value in state_dict.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("evf") / "tiny-evf-sam")


@pytest.fixture(scope="module")
def segmenter(checkpoint) -> EvfSamSegmenter:
    return load_segmenter("evf-sam", cache_size=None, checkpoint=checkpoint, batch_size=2)


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


# --- published layout ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sam_scale", "model_class", "fixture", "count", "numel"),
    [
        ("huge", EvfSamModel, "evf_sam_keys.txt", 1569, 1_315_105_328),
        ("large", EvfSam2Model, "evf_sam2_keys.txt", 1875, 898_444_850),
    ],
)
def test_full_size_keys_match_the_published_checkpoint(sam_scale, model_class, fixture, count, numel):
    config = EvfSamConfig.from_dict({**PUBLISHED_CONFIG, "sam_scale": sam_scale})
    with torch.device("meta"):
        model = build_model(config)
    assert type(model) is model_class
    published = model.published_state_dict()
    expected = read_key_fixture(fixture)
    ours = key_set(published)
    assert ours == expected, f"missing {sorted(expected - ours)[:5]}, unexpected {sorted(ours - expected)[:5]}"
    assert len(published) == count
    assert sum(value.numel() for value in published.values()) == numel
    assert model.keys.published_to_ours(published).keys() == model.state_dict().keys()


def test_sam2_key_mapping_examples():
    points = {
        f"visual_model.sam_prompt_encoder.point_embeddings.{i}.weight": torch.full((1, 2), float(i)) for i in range(4)
    }
    mapped = SAM2_KEYS.published_to_ours(
        {
            **points,
            "visual_model.memory_encoder.fuser.layers.1.weight": 1,
            "visual_model.image_encoder.trunk.blocks.3.mlp.layers.1.bias": 2,
            "visual_model.sam_mask_decoder.transformer.layers.0.cross_attn_image_to_token.out_proj.weight": 3,
            "visual_model.memory_encoder.mask_downsampler.encoder.10.bias": 4,
        }
    )
    assert torch.equal(
        mapped.pop("visual_model.prompt_encoder.point_embed.weight"), torch.arange(4.0)[:, None].repeat(1, 2)
    )
    assert mapped == {
        "visual_model.memory_encoder.memory_fuser.layers.1.scale": 1,
        "visual_model.vision_encoder.backbone.blocks.3.mlp.proj_out.bias": 2,
        "visual_model.mask_decoder.transformer.layers.0.cross_attn_image_to_token.o_proj.weight": 3,
        "visual_model.memory_encoder.mask_downsampler.layers.3.layer_norm.bias": 4,
    }
    stacked = {"visual_model.prompt_encoder.point_embed.weight": torch.arange(4.0)[:, None].repeat(1, 2)}
    split = SAM2_KEYS.ours_to_published(stacked)
    assert split.keys() == points.keys() and all(torch.equal(split[k], points[k]) for k in points)


def test_key_mapping_examples():
    mapped = SAM1_KEYS.published_to_ours(
        {
            "visual_model.image_encoder.blocks.7.norm1.weight": 1,
            "visual_model.mask_decoder.output_hypernetworks_mlps.2.layers.1.bias": 2,
            "visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": 3,
            "mm_extractor.beit3.encoder.layers.0.ffn.A.fc1.weight": 4,
        }
    )
    assert mapped == {
        "visual_model.vision_encoder.layers.7.layer_norm1.weight": 1,
        "visual_model.mask_decoder.output_hypernetworks_mlps.2.layers.0.bias": 2,
        "visual_model.prompt_encoder.shared_embedding.positional_embedding": 3,
        "visual_model.shared_image_embedding.positional_embedding": 3,
        "mm_extractor.beit3.encoder.layers.0.ffn.A.fc1.weight": 4,
    }
    assert set(SAM1_KEYS.ours_to_published(mapped)) == {
        "visual_model.image_encoder.blocks.7.norm1.weight",
        "visual_model.mask_decoder.output_hypernetworks_mlps.2.layers.1.bias",
        "visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "mm_extractor.beit3.encoder.layers.0.ffn.A.fc1.weight",
    }


def test_tiny_checkpoint_has_the_published_file_layout(checkpoint):
    assert {"config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer_config.json"} <= set(
        os.listdir(checkpoint)
    )
    with open(os.path.join(checkpoint, "config.json")) as handle:
        assert json.load(handle)["model_type"] == "evf"
    _, state_dict = load_weights(checkpoint)
    assert "visual_model.image_encoder.neck.0.weight" in state_dict
    assert not any(key.startswith("visual_model.vision_encoder") for key in state_dict)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_bin_and_safetensors_load_the_same_weights(checkpoint, tmp_path, dtype):
    model = from_pretrained(checkpoint, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for name in ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(checkpoint, name), tmp_path / name)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "pytorch_model.bin") and not os.path.exists(tmp_path / "model.safetensors")
    reloaded = from_pretrained(tmp_path, dtype=dtype)
    for (key, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), key


def test_strict_loading_names_the_bad_keys(checkpoint, tmp_path):
    config = EvfSamConfig.from_json_file(os.path.join(checkpoint, "config.json"))
    _, state_dict = load_weights(checkpoint)
    with torch.device("meta"):
        model = EvfSamModel(config)
    broken = dict(state_dict)
    del broken["mm_extractor.beit3.encoder.layers.1.ffn.B.fc2.bias"]
    broken["visual_model.unused.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"missing \(1\): mm_extractor.beit3.encoder.layers.1.ffn.B.fc2.bias.*"
        r"unexpected \(1\): visual_model.unused.weight",
    ):
        model.load_published_state_dict(broken)
    wrong = dict(state_dict, **{"text_hidden_fcs.0.2.weight": torch.zeros(5, 32)})
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): text_hidden_fcs.0.2.weight"):
        model.load_published_state_dict(wrong)
    # A tied duplicate missing from a checkpoint is reported under its published name.
    del broken["visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    with pytest.raises(ValueError, match=r"missing \(2\):.*positional_encoding_gaussian_matrix"):
        model.load_published_state_dict(broken)


def test_config_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PUBLISHED_CONFIG, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: model_type must be 'evf'"):
        EvfSamConfig.from_json_file(path)
    path.write_text(json.dumps({k: v for k, v in PUBLISHED_CONFIG.items() if k != "sam_scale"}))
    with pytest.raises(ValueError, match=r"config.json: field 'sam_scale' is missing"):
        EvfSamConfig.from_json_file(path)
    path.write_text(json.dumps({**PUBLISHED_CONFIG, "sam_scale": "base+"}))
    with pytest.raises(ValueError, match=r"sam_scale must be one of \['huge', 'large'\], got 'base\+'"):
        EvfSamConfig.from_json_file(path)
    path.write_text(json.dumps({**PUBLISHED_CONFIG, "sam": {"backbone": {}}}))
    with pytest.raises(ValueError, match=r"unknown sam fields \['backbone'\]"):
        EvfSamConfig.from_json_file(path)
    path.write_text(json.dumps({**PUBLISHED_CONFIG, "hidden_size": 768}))
    with pytest.raises(ValueError, match=r"hidden_size=768 must equal the BEiT-3 width 1024"):
        EvfSamConfig.from_json_file(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path / "missing")


# --- pre- and post-processing -----------------------------------------------------------------------------------------


def test_tokenizer_follows_the_slow_xlm_roberta_ids(checkpoint):
    import sentencepiece

    tokenizer = EvfTokenizer.from_pretrained(checkpoint)
    pieces = sentencepiece.SentencePieceProcessor(model_file=os.path.join(checkpoint, "sentencepiece.bpe.model"))
    text = "the red circle"
    assert tokenizer.encode(text) == [0] + [piece + 1 for piece in pieces.encode(text)] + [2]
    assert 0 in pieces.encode("Zebra")  # "Z" is not in the tiny vocabulary: SentencePiece <unk> (0) -> fairseq 3
    assert tokenizer.encode("Zebra") == [0] + [piece + 1 if piece else 3 for piece in pieces.encode("Zebra")] + [2]
    assert tokenizer.encode("<mask>") == [0, len(pieces) + 1, 2]
    input_ids, padding = tokenizer(["the red circle", "red"])
    assert input_ids.shape == padding.shape and input_ids.shape[0] == 2
    assert input_ids[1].tolist()[padding[1].logical_not().sum() :] == [1] * int(padding[1].sum())
    truncated, _ = tokenizer(["the red circle"], max_length=4)
    assert truncated[0].tolist() == tokenizer.encode("the red circle")[:3] + [2]


def test_tokenizer_reads_added_tokens(checkpoint, tmp_path):
    for name in ("sentencepiece.bpe.model",):
        shutil.copy(os.path.join(checkpoint, name), tmp_path / name)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[semantic]": 62}))
    tokenizer = EvfTokenizer.from_pretrained(tmp_path)
    plain = EvfTokenizer.from_pretrained(checkpoint)
    assert tokenizer.encode("[semantic] red") == [0, 62] + plain.encode("red")[1:]


def test_image_preprocessing_values():
    assert resized_shape(480, 640, 1024) == (768, 1024)
    assert resized_shape(1000, 1, 1024) == (1024, 1)
    grey = Image.new("RGB", (30, 20), (128, 64, 255))
    pixels, resized = sam_pixels(grey, 64)
    assert resized == (43, 64) and pixels.shape == (3, 64, 64)
    expected = [(value - mean) / std for value, mean, std in zip((128, 64, 255), SAM_PIXEL_MEAN, SAM_PIXEL_STD)]
    assert torch.allclose(pixels[:, :43, :].mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert torch.count_nonzero(pixels[:, 43:, :]) == 0  # zero padding after normalisation
    view = beit3_pixels(grey, 32)
    assert view.shape == (3, 32, 32)
    assert torch.allclose(view[:, 5, 7], torch.tensor([128, 64, 255]) / 255 * 2 - 1, atol=1e-6)


def test_sam2_preprocessing_stretches_the_image():
    image = Image.new("RGB", (30, 20), (128, 64, 255))
    expected = torch.tensor([(v - m) / s for v, m, s in zip((128, 64, 255), SAM_PIXEL_MEAN, SAM_PIXEL_STD)])
    for legacy in (False, True):
        pixels = sam2_pixels(image, 64, legacy=legacy)
        assert pixels.shape == (3, 64, 64)  # no padding: the whole square is image
        assert torch.allclose(pixels[:, 0, 0], expected, atol=1e-5) and torch.allclose(
            pixels[:, 63, 63], expected, atol=1e-5
        )
    stripes = np.zeros((4, 4, 3), np.uint8)
    stripes[:, 2:] = 255
    current = sam2_pixels(Image.fromarray(stripes), 8)  # bilinear on uint8 keeps 0 and 255 away from the edge
    assert torch.allclose(current[0, :, 0], torch.tensor(-SAM_PIXEL_MEAN[0] / SAM_PIXEL_STD[0]))
    logits = torch.zeros(16, 16)
    logits[:, 8:] = 1.0
    full = upsample_logits_sam2(logits, (10, 30))
    assert full.shape == (10, 30) and bool((full[:, :12] <= 0).all()) and bool((full[:, 18:] > 0).all())


def test_mask_upsampling_crops_the_padding():
    logits = -torch.ones(16, 16)
    logits[:8, :] = 1.0  # the top half of the SAM input; the image fills the top half (64x32 of 64x64)
    full = upsample_logits(logits, 64, (32, 64), (10, 20))
    assert full.shape == (10, 20)
    assert bool((full > 0).all())


# --- the segmenter ----------------------------------------------------------------------------------------------------


def test_region_mode_gives_image_sized_binary_masks(segmenter):
    images = [noise_image(50, 70), noise_image(30, 20, seed=1), noise_image(50, 70)]
    results = segmenter.segment(images, ["the red circle", "the large blue star", "the red circle"])
    assert [mask.shape for mask, _ in results] == [(50, 70), (30, 20), (50, 70)]
    for mask, score in results:
        assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        assert 0.0 <= score <= 1.0
    np.testing.assert_array_equal(results[0][0], results[2][0])


def test_batches_equal_single_pairs(segmenter):
    images = [noise_image(40, 40, seed=s) for s in range(3)] + [noise_image(40, 40, seed=0)]
    texts = ["the red circle", "the small green square on the left", "red", "the large blue star"]
    model, tokenizer = segmenter.model, segmenter.tokenizer
    batched = segmenter._segment_batch(images, texts)
    for image, text, (mask, score) in zip(images, texts, batched):
        sam, resized = sam_pixels(image, model.sam_image_size)
        ids, padding = tokenizer([text])
        with torch.no_grad():
            low, iou = model(sam[None], beit3_pixels(image, model.beit3_image_size)[None], ids, padding)
        logits = upsample_logits(low[0], model.sam_image_size, resized, (40, 40))
        np.testing.assert_array_equal(mask, (logits > 0).float().numpy())
        assert score == pytest.approx(float(iou[0].clamp(0, 1)), abs=1e-6)


def test_soft_masks_are_the_sigmoid_of_the_binary_masks_logits(checkpoint, segmenter):
    soft = EvfSamSegmenter(checkpoint=checkpoint, soft_masks=True)
    image = noise_image(24, 36, seed=3)
    ((soft_mask, soft_score),) = soft.segment([image], ["the yellow star"])
    ((hard_mask, hard_score),) = segmenter.segment([image], ["the yellow star"])
    assert soft_score == hard_score
    assert 0.0 < soft_mask.min() and soft_mask.max() < 1.0
    np.testing.assert_array_equal(soft_mask > 0.5, hard_mask > 0.5)


def test_instance_mode_splits_components_scored_by_area_share(segmenter, monkeypatch):
    mask = np.zeros((20, 30), np.float32)
    mask[2:8, 2:12] = 1.0  # 60 px
    mask[12:18, 20:25] = 1.0  # 30 px
    mask[0, 29] = 1.0  # 1 px: below min_instance_area
    monkeypatch.setattr(segmenter, "_segment_regions", lambda images, expressions: [(mask, 0.91)] * len(images))
    (instances,) = segmenter.segment([noise_image(20, 30)], ["the objects"], mode="instance")
    assert [int(m.sum()) for m, _ in instances] == [60, 30]
    assert [s for _, s in instances] == pytest.approx([0.91 * 60 / 91, 0.91 * 30 / 91])
    monkeypatch.setattr(segmenter, "_segment_regions", lambda images, expressions: [(mask * 0, 0.5)] * len(images))
    assert segmenter.segment([noise_image(20, 30)], ["nothing"], mode="instance") == [[]]


def test_load_segmenter_caches_and_rejects_bad_arguments(checkpoint, tmp_path):
    cached = load_segmenter("evf-sam", checkpoint=checkpoint)
    image = noise_image(16, 16)
    first = cached.segment([image, image], ["red", "red"])
    np.testing.assert_array_equal(first[0][0], first[1][0])
    assert (cached.hits, cached.misses) == (1, 1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        EvfSamSegmenter(checkpoint=checkpoint, dtype="int8")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; pass the directory"):
        EvfSamSegmenter(checkpoint=tmp_path / "weights.bin")


def test_tiny_config_is_smaller_than_published():
    config = EvfSamConfig.from_dict(TINY_CONFIG)
    assert config.beit3_config().embed_dim == 32 and config.sam_config().vision_config.image_size == 64
    assert EvfSamConfig.from_dict(TINY_SAM2_CONFIG).sam_config().image_size == 64


# --- EVF-SAM2 ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory) -> str:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("evf2") / "tiny-evf-sam2", sam2=True)


def test_sam2_checkpoint_loads_strictly_and_segments(sam2_checkpoint):
    _, state_dict = load_weights(sam2_checkpoint)
    assert "visual_model.memory_encoder.fuser.layers.0.weight" in state_dict  # published names, memory included
    images = [noise_image(50, 70), noise_image(30, 20, seed=1)]
    texts = ["the red circle", "the large blue star"]
    for evf_code, multimask in (("current", True), ("legacy", False)):
        segmenter = EvfSamSegmenter(checkpoint=sam2_checkpoint, evf_code=evf_code)
        assert isinstance(segmenter.model, EvfSam2Model) and segmenter.model.multimask is multimask
        results = segmenter.segment(images, texts)
        assert [mask.shape for mask, _ in results] == [(50, 70), (30, 20)]
        model = segmenter.model
        for image, text, (mask, score) in zip(images, texts, results):
            ids, padding = segmenter.tokenizer([text])
            pixels = sam2_pixels(image, model.sam_image_size, legacy=not multimask)
            with torch.no_grad():
                low, iou = model(pixels[None], beit3_pixels(image, model.beit3_image_size)[None], ids, padding)
            expected = upsample_logits_sam2(low[0], (image.height, image.width)) > 0
            np.testing.assert_array_equal(mask, expected.float().numpy())
            assert 0.0 <= score <= 1.0 and score == pytest.approx(float(iou[0]), abs=1e-6)


def test_sam2_multimask_keeps_the_best_predicted_iou(sam2_checkpoint):
    model = from_pretrained(sam2_checkpoint, multimask=True)
    features = model.image_features(sam2_pixels(noise_image(64, 64), 64)[None])
    prompts = torch.randn(1, TINY_SAM2_CONFIG["out_dim"])
    with torch.no_grad():
        low, iou = model.decode(features, prompts)
        *high_resolution, embeddings = features
        sam = model.visual_model
        masks, ious, _, _ = sam.mask_decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=prompts[:, None, None],
            dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, 4, 4),
            multimask_output=True,
            high_resolution_features=high_resolution,
        )
    best = int(ious[0, 0].argmax())
    assert ious.shape == (1, 1, 3)
    assert torch.equal(low[0], masks[0, 0, best]) and float(iou[0]) == float(ious[0, 0].max())


def test_evf_code_auto_follows_the_multitask_token(sam2_checkpoint, tmp_path):
    assert EvfSamSegmenter(checkpoint=sam2_checkpoint).legacy  # no [semantic] token: released before 9d00853
    shutil.copytree(sam2_checkpoint, tmp_path / "multitask")
    (tmp_path / "multitask" / "added_tokens.json").write_text(json.dumps({"[semantic]": 62}))
    assert not EvfSamSegmenter(checkpoint=tmp_path / "multitask").legacy
    with pytest.raises(ValueError, match="evf_code must be"):
        EvfSamSegmenter(checkpoint=sam2_checkpoint, evf_code="new")


def test_hub_ids_download_config_tokenizer_and_the_first_weights_file(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    from cgpo_trl.saliency.segmenters.evf_sam import resolve_checkpoint

    snapshot = tmp_path / "snapshot"  # a Hub repo like YxZhang/evf-sam's main branch: pytorch_model.bin only
    from_pretrained(checkpoint).save_pretrained(snapshot, safe_serialization=False)
    shutil.copy(os.path.join(checkpoint, "sentencepiece.bpe.model"), snapshot)
    requested = []

    def fake_download(repo_id, filename, revision=None):
        requested.append((repo_id, filename, revision))
        if repo_id != "YxZhang/evf-sam":
            raise RepositoryNotFoundError(f"no repo {repo_id}")
        if not (snapshot / filename).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_checkpoint("YxZhang/evf-sam", revision="main") == str(snapshot)
    assert [name for _, name, _ in requested] == [
        "config.json",
        "sentencepiece.bpe.model",
        "added_tokens.json",
        "model.safetensors",
        "pytorch_model.bin",
    ]
    assert {repo for repo, _, _ in requested} == {"YxZhang/evf-sam"} and {rev for _, _, rev in requested} == {"main"}
    (snapshot / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="has neither of"):
        resolve_checkpoint("YxZhang/evf-sam")
    with pytest.raises(ValueError, match="neither a local directory nor a downloadable Hub repo"):
        resolve_checkpoint("nobody/nothing-here")


def test_low_precision_matches_float32(sam2_checkpoint):
    image = noise_image(50, 70)
    ((reference, reference_score),) = EvfSamSegmenter(checkpoint=sam2_checkpoint).segment([image], ["the red circle"])
    for dtype in ("bfloat16", "float16"):
        segmenter = EvfSamSegmenter(checkpoint=sam2_checkpoint, dtype=dtype)
        assert {p.dtype for p in segmenter.model.parameters()} == {DTYPES[dtype]}
        ((mask, score),) = segmenter.segment([image], ["the red circle"])
        assert (mask == reference).mean() > 0.95 and score == pytest.approx(reference_score, abs=0.02)


def test_early_fusion_routes_vision_through_A_and_text_through_B(checkpoint):
    model = from_pretrained(checkpoint)
    tokenizer = EvfTokenizer.from_pretrained(checkpoint)
    pixels = beit3_pixels(noise_image(40, 40), model.beit3_image_size)[None].repeat(2, 1, 1, 1)
    ids, padding = tokenizer(["the red circle", "the large blue star"])
    with torch.no_grad():
        prompts = model.prompt_embeddings(pixels, ids, padding)
        assert not torch.allclose(prompts[0], prompts[1])  # the text reaches the vision CLS through attention
        text_norm = model.mm_extractor.beit3.encoder.layer_norm.B
        text_norm.weight.mul_(3.0)  # the text expert's output norm never touches the CLS token
        assert torch.equal(model.prompt_embeddings(pixels, ids, padding), prompts)
        model.mm_extractor.beit3.encoder.layer_norm.A.weight.mul_(3.0)
        assert not torch.allclose(model.prompt_embeddings(pixels, ids, padding), prompts)
