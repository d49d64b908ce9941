import os


def test_write_then_read(client):
    data = os.urandom(50_000)
    with client.open("a", "w") as f:
        f.write(data)
    with client.open("a", "r") as f:
        assert f.read() == data
    assert client.list() == []
