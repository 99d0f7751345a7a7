"""`keras-resnet weights`: the weights catalogue as a table, without starting TensorFlow.

The table is `keras_resnet_settings.weights.CATALOGUE`; a row says which
weights `"imagenet"` picks for its preset, what the source publishes (accuracy,
the evaluation it was measured with, size, licence) and whether the file is
in this machine's cache already (`keras-resnet weights --download PRESET`
puts it there).
"""

COLUMNS = ("preset", "weights", "published accuracy", "evaluation", "MB", "cached")
WIDE_COLUMNS = ("preset", "weights", "trained on", "published accuracy", "evaluation", "MB", "licence", "cached")


def rows(name_filter: str = "") -> list:
    """One dict (a value per `WIDE_COLUMNS` name) per catalogue entry whose preset or tag contains `name_filter`."""
    from keras_resnet_settings.weights import CATALOGUE, DEFAULT_IMAGENET, cached_path

    found = []
    for entry in CATALOGUE:
        if name_filter and name_filter not in entry.preset and name_filter not in entry.tag:
            continue
        names = [entry.tag]
        if DEFAULT_IMAGENET.get(entry.preset) == entry.tag:
            names.append('"imagenet"')
        names += [f'"{alias}"' for alias in entry.aliases]
        found.append(dict(zip(WIDE_COLUMNS, (
            entry.preset, ", ".join(names), entry.dataset, entry.metric_text(), entry.evaluation_text(),
            f"{entry.size_mb:g}" if entry.size_mb else "-", entry.license.split(";")[0].split(" (")[0],
            "yes" if cached_path(entry) is not None else "",
        ))))
    return found


def print_weights(name_filter: str = "", wide: bool = False) -> None:
    """Print the catalogue (rows whose preset or tag contains `name_filter`) and where the cache is.

    `wide` adds what the weights were trained on and their licence (the table may exceed the terminal).
    """
    from rich.console import Console
    from rich.table import Table

    from keras_resnet_settings.weights import cache_dir

    columns = WIDE_COLUMNS if wide else COLUMNS
    table = Table(title="keras_resnet weights catalogue")
    for column in columns:
        table.add_column(column, justify="right" if column == "MB" else "left", overflow="fold")
    for row in rows(name_filter):
        table.add_row(*(row[column] for column in columns))
    console = Console(width=None if wide else max(Console().width, 120))
    console.print(table)
    console.print(
        f"cache: {cache_dir()} (KERAS_RESNET_CACHE). Load by name: from_preset(PRESET, weights=\"imagenet\" or a "
        "tag); recipes: model.weights; download ahead: keras-resnet weights --download PRESET [--weights NAME].",
        soft_wrap=True,
    )
