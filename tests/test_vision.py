"""Vision-language DPO: image rows through the processor, pixels through collate, both reference paths and
the model (dpo_ray/vision/, docs/data.md "Vision-language models"). The 2-worker run on the tiny LLaVA is
examples/vlm_tiny.yaml's documented command, run by tests/test_docs_commands.py with the same checks."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_ray.config import ConfigError, DPOConfig
from dpo_ray.data import BadRowError, collate_pairs, load_processing_class, tokenize_rows
from dpo_ray.data.rows import BadRow
from dpo_ray.vision import image_token_ids
from dpo_ray.vision.tiny import VISION_DIR, VISION_TRAIN_FILE, build_tiny_vlm, vision_pair

IMAGE_TOKENS = 16  # 32x32 images in 8x8 patches


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return str(build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm")))


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return load_processing_class(vlm_dir)


def bundled_rows(n: int) -> list[dict]:
    """The first bundled vision rows, image paths made absolute (in-memory rows have no file to resolve
    against)."""
    rows = [json.loads(line) for line in VISION_TRAIN_FILE.read_text().splitlines()[:n]]
    for r in rows:
        r["images"] = [str(VISION_DIR / p) for p in r["images"]]
    return rows


def cfg(**kw) -> DPOConfig:
    return DPOConfig(**{"max_length": 64, **kw})


def test_bundled_image_set_is_small_and_well_formed():
    files = [p for p in VISION_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1 << 20
    rows = [json.loads(line) for line in VISION_TRAIN_FILE.read_text().splitlines()]
    assert len(rows) >= 64 and all((VISION_DIR / r["images"][0]).is_file() for r in rows)
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_processor_expands_images_and_completion_mask_skips_image_tokens(processor):
    cols = tokenize_rows(bundled_rows(4), processor, cfg())
    assert [list(s) for s in cols["pixel_values_shape"]] == [[1, 3, 32, 32]] * 4
    batch = collate_pairs(cols, processor.tokenizer.pad_token_id)
    image_ids = image_token_ids(processor)
    is_image = torch.isin(batch["input_ids"], torch.tensor(sorted(image_ids)))
    assert (is_image.sum(1) == IMAGE_TOKENS).all()  # every sequence carries its image's tokens
    assert not (batch["completion_mask"].bool() & is_image).any()  # log-probs cover only completion text
    completion = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert processor.tokenizer.convert_ids_to_tokens(completion) == [
        bundled_rows(1)[0]["chosen"][0]["content"][0]["text"], "<eos>"]


def test_collate_lines_up_pixels_with_the_2b_rows(processor):
    cols = tokenize_rows(bundled_rows(3), processor, cfg())
    batch = collate_pairs(cols, processor.tokenizer.pad_token_id)
    b = 3
    assert batch["input_ids"].shape[0] == 2 * b and batch["pixel_values"].shape == (2 * b, 3, 32, 32)
    for i in range(b):
        own = torch.from_numpy(cols["pixel_values"][i].reshape(1, 3, 32, 32))[0]
        assert torch.equal(batch["pixel_values"][i], own) and torch.equal(batch["pixel_values"][b + i], own)
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])


def test_text_only_rows_mix_with_image_rows(processor):
    text_row = {"prompt": [{"role": "user", "content": "what colour is the shape ?"}],
                "chosen": [{"role": "assistant", "content": "red"}],
                "rejected": [{"role": "assistant", "content": "blue"}]}
    cols = tokenize_rows([text_row, *bundled_rows(1)], processor, cfg())
    batch = collate_pairs(cols, processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 2  # one image, for its chosen and rejected rows


def test_missing_or_unreadable_image_names_the_row_and_the_file(processor, tmp_path):
    missing = vision_pair(str(tmp_path / "nope.png"), "red", "blue")
    with pytest.raises(BadRowError, match=r"bad_image.*row 1: .*nope\.png.*not found") as e:
        tokenize_rows([bundled_rows(1)[0], missing], processor, cfg())
    assert e.value.kind == "bad_image" and e.value.row_id == 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(BadRowError, match=r"row 0: .*broken\.png.*not a readable image"):
        tokenize_rows([vision_pair(str(broken), "red", "blue")], processor, cfg())
    raw_bytes = {**vision_pair("x", "red", "blue"), "images": [b"garbage"]}
    with pytest.raises(BadRowError, match=r"images\[0\] \(bytes\) is not a readable image"):
        tokenize_rows([raw_bytes], processor, cfg())
    cols = tokenize_rows([missing, *bundled_rows(2)], processor, cfg(on_bad_row="skip"))
    assert list(cols["row_id"]) == [1, 2]


def test_images_in_a_jsonl_resolve_against_its_directory(processor, tmp_path):
    from dpo_ray.data.tokenize import RawRow, RowProcessor, TokenizeOptions

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes((VISION_DIR / "images" / "0000.png").read_bytes())
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps(vision_pair("imgs/a.png", "red", "blue")) + "\n")
    proc = RowProcessor(processor, TokenizeOptions.from_config(cfg()), str(source))
    table, stats = proc.process([RawRow(0, 1, json.loads(source.read_text()))])
    assert stats.kept == 1 and table.column("pixel_values_shape").to_pylist() == [[1, 3, 32, 32]]


def test_keep_end_is_refused_for_vision_models(vlm_dir, processor):
    with pytest.raises(ConfigError, match=r"truncation_mode: keep_end cuts tokens.*image tokens"):
        DPOConfig(model_name_or_path=vlm_dir, truncation_mode="keep_end")
    # a processor passed from Python (no model directory in the config): the driver's data step refuses it
    with pytest.raises(ConfigError, match=r"truncation_mode"):
        tokenize_rows(bundled_rows(1), processor, cfg(truncation_mode="keep_end"))
    DPOConfig(truncation_mode="keep_end")  # text models keep it


def test_keep_start_never_cuts_into_image_tokens(processor):
    # the prompt is 3 + 16 image + 7 text tokens: max_length 20 would cut the image tokens -> dropped, counted
    with pytest.raises(BadRowError, match="prompt_fills_max_length"):
        tokenize_rows(bundled_rows(1), processor, cfg(max_length=20))
    assert (len(tokenize_rows(bundled_rows(2), processor, cfg(max_length=20, on_bad_row="skip"))["row_id"])
            == 0)
    # image tokens past the prompt (the guard is on every kept sequence): cutting them is refused too
    from dpo_ray.data.tokenize import RowProcessor, TokenizeOptions

    proc = RowProcessor(processor, TokenizeOptions.from_config(cfg(max_length=6)))
    img = sorted(image_token_ids(processor))[0]
    with pytest.raises(BadRow, match=r"would cut 2 of the row's image tokens"):
        proc._sequence([1, 5, 6], [1, 5, 6, 7, 8, 9, img, img], True)
    assert proc._sequence([1, 5, 6], [1, 5, 6, 7, img, img, 9, 9], True) == ([1, 5, 6, 7, img, img], 3, True)


def test_model_loads_as_image_text_to_text_and_uses_the_pixels(vlm_dir, processor):
    from dpo_ray.forward import reference_logps, sequence_forward
    from dpo_ray.models import load_causal_lm

    model = load_causal_lm(vlm_dir, cfg(), processor)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    batch = collate_pairs(tokenize_rows(bundled_rows(2), processor, cfg()), processor.tokenizer.pad_token_id)
    stats = sequence_forward(model, batch).stats
    assert stats.logps.shape == (4,) and torch.isfinite(stats.logps).all()
    assert torch.equal(stats.num_tokens, batch["completion_mask"].sum(1).to(stats.num_tokens.dtype))
    other = {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}
    assert not torch.allclose(reference_logps(model, batch)[0], reference_logps(model, other)[0])


def test_both_reference_paths_send_the_pixels(vlm_dir, processor):
    from dpo_ray.forward import reference_logps
    from dpo_ray.reference import LocalReference
    from dpo_ray.reference.actor import ReferenceModelHost
    from dpo_ray.reference.client import ActorPoolReference

    c = cfg(model_name_or_path=vlm_dir)
    batch = collate_pairs(tokenize_rows(bundled_rows(2), processor, c), processor.tokenizer.pad_token_id)
    host = ReferenceModelHost(c, vlm_dir, processor)
    expected = reference_logps(host.model, batch)
    _, _, chosen, rejected = host.logps("r0", batch)  # answers travel as numpy
    assert (torch.allclose(torch.from_numpy(chosen), expected[0])
            and torch.allclose(torch.from_numpy(rejected), expected[1]))
    local = LocalReference(host.model, torch.device("cpu"))
    assert torch.allclose(local.result(None, batch)[0], expected[0])

    class FakeActor:  # records what the client would send over Ray
        sent: dict = {}

        class logps:  # noqa: N801 - mimics an actor method handle
            @staticmethod
            def remote(request_id, payload, ld_alpha, model=None):
                FakeActor.sent = payload
                return None

    ActorPoolReference([FakeActor()], c, rank=0).submit(batch)
    assert (set(FakeActor.sent) == {"input_ids", "attention_mask", "completion_mask", "pixel_values",
                                    "packed_width"})
    assert torch.equal(torch.as_tensor(FakeActor.sent["pixel_values"]), batch["pixel_values"])


def test_precomputed_reference_is_refused_for_vision(vlm_dir, processor):
    from dpo_ray.reference.precompute import attach_reference_logps

    with pytest.raises(ConfigError,
                       match=r"reference.source: precomputed reference log-probs do not carry images"):
        DPOConfig(model_name_or_path=vlm_dir, reference={"source": "precomputed"})
    with pytest.raises(ConfigError, match=r"reference.source"):
        attach_reference_logps(None, cfg(), None, processor, split="train")


def test_rows_with_images_need_a_processor():
    from dpo_ray.data import load_tokenizer

    with pytest.raises(ValueError, match="AutoProcessor"):
        tokenize_rows(bundled_rows(1), load_tokenizer(), cfg())
