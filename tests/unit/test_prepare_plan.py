"""The shard plan: the unit of work and retry, so it must be deterministic and keep every video once."""

from rigface.data.dataset import Dataset, plan_shards


def videos():
    return [
        {"url": f"/v/{n}.mp4", "name": f"{n}.mp4", "source": "/v", "content_hash": h, "video_id": vid, "split": "train"}
        for n, h, vid in [("a", "c" * 64, "same"), ("b", "a" * 64, "same"), ("c", "b" * 64, None), ("d", "d" * 64, None)]
    ]


def test_plan_is_deterministic_and_ids_are_unique():
    plan1, dups1 = plan_shards(Dataset("/out"), videos(), version=1, videos_per_shard=2, val_fraction=0.0, seed=0,
                               known=set())
    plan2, _ = plan_shards(Dataset("/out"), list(reversed(videos())), version=1, videos_per_shard=2,
                           val_fraction=0.0, seed=0, known=set())
    ids = lambda plan: {u: [m["video_id"] for m in ms] for u, ms in plan.items()}  # noqa: E731
    assert ids(plan1) == ids(plan2), "input order must not change the plan"
    assert len(plan1) == 2 and not dups1
    all_ids = [i for ms in ids(plan1).values() for i in ms]
    assert len(all_ids) == 4 and len(set(all_ids)) == 4, "two manifest rows naming one id stay apart"


def test_known_and_repeated_content_is_skipped():
    vs = videos() + [dict(videos()[0], url="/v/copy.mp4", name="copy.mp4")]
    plan, dups = plan_shards(Dataset("/out"), vs, version=2, videos_per_shard=8, val_fraction=0.0, seed=0,
                             known={"d" * 64})
    planned = [m["content_hash"] for ms in plan.values() for m in ms]
    assert sorted(planned) == sorted(["a" * 64, "b" * 64, "c" * 64])
    assert {d["content_hash"] for d in dups} == {"c" * 64, "d" * 64}


def test_same_sampled_hash_other_bytes_is_kept_with_its_full_hash():
    full = {"/v/a.mp4": "1" * 64, "/v/copy.mp4": "1" * 64, "/v/edit.mp4": "2" * 64}
    vs = [dict(videos()[0], url=u, name=u.rsplit("/", 1)[-1], video_id=None) for u in full]
    plan, dups = plan_shards(Dataset("/out"), vs, version=1, videos_per_shard=8, val_fraction=0.0, seed=0,
                             known=set(), full_hash=full.__getitem__)
    planned = {m["url"]: m["content_hash"] for ms in plan.values() for m in ms}
    assert [d["url"] for d in dups] == ["/v/copy.mp4"]  # the true copy goes
    assert planned == {"/v/a.mp4": "c" * 64, "/v/edit.mp4": "2" * 64}  # the edit stays, under its full hash
