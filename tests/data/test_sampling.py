import numpy as np

from molre.data.sampling import class_repeat_factors, epoch_indices, image_repeat_factors


def test_factors_equal_the_lvis_formula():
    labels = np.zeros((100, 4), dtype=np.uint8)
    labels[:50, 0] = 1  # f = 0.5
    labels[:4, 1] = 1  # f = 0.04
    labels[10:11, 2] = 1  # f = 0.01
    t = 0.1
    r_c = class_repeat_factors(labels, t)
    np.testing.assert_allclose(r_c, [1.0, np.sqrt(0.1 / 0.04), np.sqrt(0.1 / 0.01), 1.0])
    r_v = image_repeat_factors(labels, t)
    assert r_v[0] == r_c[1]  # volume 0 has classes 0 and 1: max
    assert r_v[10] == r_c[2] and r_v[99] == 1.0


def test_stochastic_rounding_is_seeded_and_unbiased():
    r = np.array([1.0, 2.5, 1.2, 3.0])
    a, b = epoch_indices(r, epoch=3, seed=7), epoch_indices(r, epoch=3, seed=7)
    np.testing.assert_array_equal(a, b)
    counts = np.stack([np.bincount(epoch_indices(r, e, seed=1), minlength=4) for e in range(4000)])
    assert (counts[:, 0] == 1).all() and (counts[:, 3] == 3).all()
    assert set(np.unique(counts[:, 1])) == {2, 3}
    np.testing.assert_allclose(counts.mean(0), r, atol=0.03)
