"""Draws docs/img/request_path.png (the path of one request, docs/architecture.md) with Pillow:
    .venv/bin/python docs/img/request_path.py"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 1100, 760
BOX = {  # name: (x, y, w, h, text, fill)
    "cli": (40, 30, 480, 70, "stag4d generate INPUT | --prompt | --example\ncli.py: flags from request.OPTIONS", "#dbeafe"),
    "http": (555, 30, 505, 70, "POST /v1/jobs\nserver/routes/jobs.py: JobOptions == request.OPTIONS", "#dbeafe"),
    "json": (330, 150, 440, 60, "JOB/job.json  {kind, input | prompt, options}", "#fef3c7"),
    "run": (290, 260, 520, 60, "pipeline.run_job(job_dir, progress, should_stop)\n(in the CLI, or the server's worker process)", "#dcfce7"),
    "for": (290, 360, 520, 60, "pipeline.stages_for(request): stages, each with\nonly its own options (request.stage_options)", "#dcfce7"),
    "stages": (40, 470, 1020, 70, "stages/  video -> preprocess -> anchors -> fit -> bake     (example -> fit -> bake)\n"
               "is_done(job, options) ?  skip  :  run(job, options, progress, should_stop)  -> JobStopped", "#ede9fe"),
    "low": (40, 590, 500, 60, "media/, models/, export/ (USD, PLY, mesh, live preview)\nrender/, gaussians/ (pure math)", "#f3f4f6"),
    "ev": (600, 590, 460, 60, "JOB/events.jsonl + job.json state\n-> SSE / long-poll -> Blender add-on", "#fee2e2"),
}
ARROWS = [("cli", "json"), ("http", "json"), ("json", "run"), ("run", "for"), ("for", "stages"), ("stages", "low"),
          ("stages", "ev")]


def main() -> None:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 17)
    except OSError:
        font = ImageFont.load_default()
    centre = {}
    for name, (x, y, w, h, text, fill) in BOX.items():
        d.rounded_rectangle((x, y, x + w, y + h), 10, fill=fill, outline="#374151", width=2)
        d.multiline_text((x + w / 2, y + h / 2), text, fill="black", font=font, anchor="mm", align="center")
        centre[name] = (x, y, w, h)
    for a, b in ARROWS:
        ax, ay, aw, ah = centre[a]
        bx, by, bw, bh = centre[b]
        x0, y0 = ax + aw / 2, ay + ah
        x1, y1 = bx + bw / 2, by
        if a in ("cli", "http"):
            x1 = bx + bw * (0.3 if a == "cli" else 0.7)
        if b in ("low", "ev"):
            x0 = ax + (bx + bw / 2 - ax)
        d.line((x0, y0, x1, y1), fill="#374151", width=3)
        d.polygon([(x1, y1), (x1 - 8, y1 - 14), (x1 + 8, y1 - 14)], fill="#374151")
    d.text((40, 700), "One request, one orchestrator, one stage contract, one stop signal (job.JobStopped).",
           fill="#374151", font=font)
    img.save(Path(__file__).with_suffix(".png"))


if __name__ == "__main__":
    main()
