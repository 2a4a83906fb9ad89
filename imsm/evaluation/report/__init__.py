"""The report: saved results read back, label rows, paired comparisons, tables, charts and the one writer of
every report file."""
