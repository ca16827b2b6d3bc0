import pickle

from molre.data.storage import StorageError
from molre.errors import ConfigError, DataError


def test_errors_survive_pickling_as_ray_sends_them_between_processes():
    """A DataError raised in a Ray worker (a bad shard row) reaches the driver as itself, path and reason kept."""
    for error in (DataError("s3://b/train/a.parquet", "row 2 (study 0f3a): bad shape"), ConfigError("x: bad"),
                  StorageError("s3://b/x: read failed")):  # fmt: skip
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
    back = pickle.loads(pickle.dumps(DataError("a.parquet", "bad")))
    assert (back.path, back.reason) == ("a.parquet", "bad")
