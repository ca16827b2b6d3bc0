from molre.ray_init import existing_cluster


def test_the_cluster_to_join_is_ray_address_else_what_ray_start_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert existing_cluster() is None  # nothing recorded: a private local Ray is started
    (tmp_path / "ray").mkdir()
    # as `ray start --head` records its address
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379\n")
    assert existing_cluster() == "127.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert existing_cluster() == "10.0.0.5:6379"
