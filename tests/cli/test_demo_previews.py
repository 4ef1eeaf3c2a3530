"""``make demo`` ends with pictures: one overlay PNG per result, outlines on the cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from harness.local_pool import write_pool
from harness.ports import free_port


def test_demo_writes_an_overlay_png_per_result(tmp_path: Path, redis_server, monkeypatch, capfd) -> None:
    import demo  # tools/demo.py

    monkeypatch.chdir(tmp_path)
    pool = write_pool(tmp_path / "pool.yaml", "demo", redis_server.port, free_port(),
                      Path("demo-bucket"), maxWorkers=2, cooldownSeconds=0.5)
    assert demo.main(["-f", str(pool), "--images", "3", "--model-latency-ms", "0"]) == 0
    out = capfd.readouterr().out
    previews = sorted((tmp_path / ".kiosk-local" / "demo" / "previews").glob("*.png"))
    assert len(previews) == 3, out
    assert "Previews" in out and str(Path(".kiosk-local") / "demo" / "previews") in out
    for path in previews:
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
        outline = ~grey  # outlines are coloured; the input underneath is grey
        assert 0.01 < outline.mean() < 0.5, (path, outline.mean())
        # The outlines sit on the cells: the input under them is far brighter than the background.
        source = tifffile.imread(tmp_path / "demo-bucket" / "inputs" / (path.name.split("_batch_")[0] + ".tif"))
        assert source.shape == outline.shape
        assert np.median(source[outline]) > 3 * np.median(source[~outline]), path
