"""python -m gsa_kernels fit: an image folder made here (class subfolders), .npy and .safetensors
sources; the stats load, carry their data shape and teleport; another shape is refused."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import gsa_kernels as gk
from gsa_kernels.__main__ import main
from gsa_kernels.tools import fit_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    pixels = {}
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir()
        for i in range(7):
            a = np.clip(rng.normal(60 + 120 * c, 40, size=(10, 12, 3)), 0, 255).astype(np.uint8)  # 12 wide, 10 high
            Image.fromarray(a).save(root / name / f"{i}.png")
            pixels[(name, i)] = a
    return root, pixels


def test_fit_image_folder_per_class_loads_and_teleports(folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "stats.safetensors"
    assert main(["fit", str(root), "--rank", "4", "--per-class", "--resolution", "8", "--batch-size", "5",
                 "--no-progress", "-o", str(out)]) == 0
    assert "GaussianMixture of 14 samples of shape (3, 8, 8)" in capsys.readouterr().out
    m = fit_cli.load_stats(out, shape=(3, 8, 8))
    assert isinstance(m, gk.GaussianMixture) and m.num_components == 2 and m.rank == 4
    meta = m.data_meta
    assert meta["shape"] == (3, 8, 8) and meta["classes"] == ["cat", "dog"] and meta["rows"] == "14"
    assert "centre crop 8x8" in meta["transform"] and meta["range"] == "-1,1"
    assert m.means[0].mean() < -0.2 < 0.2 < m.means[1].mean()  # dark cats, bright dogs
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\).*shape \(3, 16, 16\)"):
        fit_cli.load_stats(out, shape=(3, 16, 16))
    noise = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 0, 1])
    x = gk.sampling.teleport(noise, float("inf"), 0.5, m, labels=labels)
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_fit_image_folder_equals_fit_of_the_pixels(folder, tmp_path):
    root, pixels = folder
    out = tmp_path / "g.safetensors"
    main(["fit", str(root), "--no-progress", "--batch-size", "4", "-o", str(out)])  # no resize: 10 x 12
    g = fit_cli.load_stats(out)
    x = torch.stack([torch.from_numpy(pixels[k].astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)
                     for k in sorted(pixels)])  # sorted paths: cat/0..6, dog/0..6
    ref = gk.GaussianModel.fit(x)
    torch.testing.assert_close(g.mean, ref.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.eigvals, ref.eigvals, atol=1e-4, rtol=1e-4)
    assert g.data_meta["shape"] == (3, 10, 12)


def test_fit_arrays_and_scale(tmp_path):
    x = torch.randn(40, 2, 4, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", np.arange(40) % 3)
    out = tmp_path / "npy.safetensors"
    main(["fit", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--per-class", "--rank", "2",
          "--no-progress", "-o", str(out)])
    m = fit_cli.load_stats(out, shape=(2, 4, 4))
    assert m.num_components == 3
    from safetensors.torch import save_file

    main(["fit", str(tmp_path / "x.npy"), "--mixture", "2", "--rank", "2", "--no-progress",
          "-o", str(tmp_path / "mix.safetensors")])
    mix = fit_cli.load_stats(tmp_path / "mix.safetensors", shape=(2, 4, 4))
    assert (mix.num_components, mix.rank) == (2, 2) and mix.data_meta["fit"] == "mixture 2"
    save_file({"latents": x.contiguous()}, str(tmp_path / "z.safetensors"))
    main(["fit", str(tmp_path / "z.safetensors"), "--scale", "0.5", "--rank", "3", "--no-progress",
          "-o", str(tmp_path / "z_stats.safetensors")])
    g = fit_cli.load_stats(tmp_path / "z_stats.safetensors")
    torch.testing.assert_close(g.mean, 0.5 * x.reshape(40, -1).mean(0), atol=1e-6, rtol=0)
    assert g.data_meta["scale"] == "0.5" and json.loads(json.dumps(g.data_meta["shape"])) == [2, 4, 4]


@pytest.mark.parametrize("argv,message", [
    (["--rank", "-1"], "must be >= 0"),
    (["--batch-size", "0"], "must be >= 1"),
    (["--per-class", "--mixture", "2"], "exclude each other"),
    (["--mixture", "2"], "needs --rank"),
])
def test_fit_usage_errors(folder, tmp_path, capsys, argv, message):
    root, _ = folder
    with pytest.raises(SystemExit):
        main(["fit", str(root), "-o", str(tmp_path / "s.safetensors")] + argv)
    assert message in capsys.readouterr().err


def test_fit_mixed_sizes_need_resolution(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="give --resolution"):
        main(["fit", str(tmp_path), "--no-progress", "-o", str(tmp_path / "s.safetensors")])


def test_fitted_stats_switch_a_pipeline_and_refuse_another_shape(folder, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    root, _ = folder
    out = tmp_path / "stats.safetensors"
    main(["fit", str(root), "--rank", "4", "--resolution", "8", "--no-progress", "-o", str(out)])
    g = fit_cli.load_stats(out)

    def pipe(size, channels):
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                                     block_out_channels=(8, 16), norm_num_groups=4,
                                     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        p = diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler())
        p.set_progress_bar_config(disable=True)
        return p

    from gsa_kernels.integrations import diffusers as gd

    ok = gd.enable_teleport(pipe(8, 3), g, skip_fraction=0.5)
    images = ok(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 8, 8)
    wrong = gd.enable_teleport(pipe(16, 1), g)  # another shape: refused naming both, before any op
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\).*shape \(1, 16, 16\)"):
        wrong(batch_size=1, num_inference_steps=4, output_type="pt")
