"""`dzjax bench`: being written."""


def add_arguments(parser) -> None:
    pass


def run(args) -> None:
    raise NotImplementedError
