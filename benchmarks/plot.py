"""Draw the benchmark's results, from a saved JSON file; nothing is measured again.

    python benchmarks/plot.py [results.json [out.png]]
    python benchmarks/plot.py --figures [DIRECTORY] [results.json]

The first form draws one overview image, one panel per workload, titled with the machine
and date; run.py calls :func:`render` for it after a run. The second draws one figure per
question the manual's Performance page asks (how many messages a second, how long a round
trip, ...), each sized to be read in the manual's text column, into DIRECTORY
(``manual/_static`` by default) from ``benchmarks/results/latest.json`` by default:
:func:`render_figures`.
"""

import json
import os
import sys
import textwrap

import matplotlib

matplotlib.use('Agg')   # a file, never a window: this also runs on machines without one
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

SHORT = {
    'looppool_submit': 'looppool submit',
    'looppool_map': 'looppool map',
    'looppool_map_iter': 'looppool map, async for',
    'looppool_batch_map': 'looppool map, batch',
    'looppool_put_nowait': 'looppool put_nowait',
    'looppool_remote': 'looppool remote',
    'process_pool_executor': 'ProcessPoolExecutor',
    'process_pool_executor_map': 'ProcessPoolExecutor map',
    'aiomultiprocess_pool': 'aiomultiprocess',
    'aiomultiprocess_fork': 'aiomultiprocess fork',
    'ceiling': 'ceiling',
}
COLOURS = {
    'looppool_submit': '#1f77b4',
    'looppool_map': '#08306b',
    'looppool_map_iter': '#4292c6',
    'looppool_batch_map': '#2171b5',
    'looppool_put_nowait': '#6baed6',
    'looppool_remote': '#17becf',
    'process_pool_executor': '#9467bd',
    'process_pool_executor_map': '#3f007d',
    'aiomultiprocess_pool': '#ff7f0e',
    'aiomultiprocess_fork': '#fdae6b',
    'ceiling': '#7f7f7f',
}

# (workload, [(field, label)], title, log scale, better)
PANELS = [
    ('W1', [('msg_per_s', None)], 'W1 throughput, msg/s', True, 'higher'),
    ('W2', [('p50_us', 'p50'), ('p99_us', 'p99')], 'W2 round-trip latency, µs', True,
     'lower'),
    ('W3', [('seconds', None)], 'W3 2,000 × sleep(0.05), wall s', True, 'lower'),
    ('W4', [('mib_per_s', None)], 'W4 1 MiB round trips, MiB/s', False, 'higher'),
    ('W5', [('start_ms', 'start'), ('stop_ms', 'stop')], 'W5 start-up and stop, ms', True,
     'lower'),
    ('W6', [('speedup_1', '1 worker'), ('speedup_2', '2 workers')],
     'W6 CPU-bound speed-up, ×', False, 'higher'),
    ('W7', [('seconds', None)], 'W7 uneven CPU-bound tasks, wall s', False, 'lower'),
    ('W8', [('io_p50_ms', 'p50'), ('io_p90_ms', 'p90'), ('io_p99_ms', 'p99')],
     'W8 IO latency behind a blocked loop, ms', True, 'lower'),
    ('MEM', [('worker_rss_mib', 'RSS'), ('worker_uss_mib', 'USS')],
     'Idle worker memory, MiB', False, 'lower'),
]


def render(results, path):
    summary = results['summary']
    names = [name for name in results['peers'] if name in summary]
    # A panel for each workload that ran, four to a row, and the notes in the room left.
    ran = {run['workload'] for run in results['runs']}
    panels = [entry for entry in PANELS if entry[0] in ran]
    columns = min(4, len(panels) + 1)
    rows = -(-(len(panels) + 1) // columns)
    fig = plt.figure(figsize=(4.25 * columns, 5 * rows))
    grid = fig.add_gridspec(rows, columns)
    axes = [fig.add_subplot(grid[index // columns, index % columns])
            for index in range(len(panels))]
    last = len(panels)
    notes = fig.add_subplot(grid[last // columns, last % columns:])
    for ax, (workload, fields, title, log, better) in zip(axes, panels):
        panel(ax, summary, names, workload, fields, log,
              ratio_to=ideal(summary, names) if workload == 'W7' else None)
        if workload == 'W3':
            sizes = [run['info']['size'] for run in results['runs']
                     if run['workload'] == 'W3' and run['info']]
            if sizes:
                title = f'W3 {sizes[0]:,} × sleep(0.05), wall s'
            ax.axhline(0.05, color='black', linewidth=0.8, linestyle=':', label='ideal 0.05 s')
        if workload == 'W6':
            reference(ax, summary, names, 'W6', 'machine_speedup_2',
                      'two bare processes, no pool')
        if workload == 'MEM':
            reference(ax, summary, names, 'MEM', 'bare_rss_mib',
                      'python -c "import tornado", RSS')
        if workload == 'W7':
            title = w7_lines(ax, results, summary, names) or title
        if workload == 'W8':
            title = w8_lines(ax, results, summary, names) or title
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7.5, loc='upper left')
        # Wrapped: four panels to a row leave room for about 50 characters a line.
        ax.set_title('\n'.join(textwrap.wrap(f'{title} ({better} is better)', 50)),
                     fontsize=10)
    info_panel(notes, results, names)
    m = results['machine']
    fig.suptitle(f'looppool against its alternatives, 2 workers ({results["mode"]} run, '
                 f'{results["date"][:10]})\n{m["cpu"]}, {m["cpus"]} CPUs, {m["memory"]}, '
                 f'Python {m["python"]}', fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The look of the bars of a panel's first, second and third figure.
STYLES = [(1.0, None), (0.6, '//'), (0.35, 'xx')]


def panel(ax, summary, names, workload, fields, log, ratio_to=None):
    """Bars of each peer's medians; with `ratio_to`, each labelled with its ratio to that."""
    # Only the peers that ran this workload (some run only a few), so no empty slots.
    names = [name for name in names if workload in summary[name]]
    width = 0.8 / len(fields)
    for index, (field, label) in enumerate(fields):
        xs, heights, colours = [], [], []
        for position, name in enumerate(names):
            entry = summary[name].get(workload)
            value = entry['median'].get(field) if entry else None
            if value is None:
                if entry and entry['error'] and index == 0:
                    ax.annotate('failed', (position, 0), xycoords=('data', 'axes fraction'),
                                ha='center', va='bottom', fontsize=8, color='red')
                continue
            xs.append(position + (index - (len(fields) - 1) / 2) * width)
            heights.append(value)
            colours.append(COLOURS.get(name, '#333333'))
        alpha, hatch = STYLES[index]
        bars = ax.bar(xs, heights, width=width * 0.95, color=colours, alpha=alpha,
                      hatch=hatch, label=label if label else '_nolegend_')
        for bar, value in zip(bars, heights):
            text = number(value)
            if ratio_to:
                text += f'\n{value / ratio_to:.2f}× ideal'
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, value),
                        ha='center', va='bottom', fontsize=7)
    ax.set_xticks(range(len(names)))
    # Slanted: up to nine names side by side would overlap if written straight.
    ax.set_xticklabels([SHORT.get(name, name) for name in names], fontsize=7.5, rotation=35,
                       ha='right', rotation_mode='anchor')
    # Head room above the bars for their labels and the legend.
    if log:
        ax.set_yscale('log')
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 8)
    else:
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.grid(axis='y', alpha=0.3)


def reference(ax, summary, names, workload, field, label):
    """A dotted line for a figure every peer measured alike (their median)."""
    values = sorted(summary[name][workload]['median'][field] for name in names
                    if workload in summary[name]
                    and field in summary[name][workload]['median'])
    if values:
        value = values[len(values) // 2]
        ax.axhline(value, color='black', linewidth=0.8, linestyle=':',
                   label=f'{label}: {value:.2f}')


def ideal(summary, names):
    """W7's ideal time (the same in every record of a run), or None."""
    values = [summary[name]['W7']['median'].get('ideal_s') for name in names
              if 'W7' in summary[name]]
    values = [value for value in values if value]
    return values[0] if values else None


def w7_lines(ax, results, summary, names):
    """W7's ideal and the target of issue 13; returns the panel's title."""
    best = ideal(summary, names)
    if best is None:
        return None
    ax.axhline(best, color='black', linewidth=0.8, linestyle=':',
               label=f'ideal {best:.2f} s')
    # The target is two bounds, 1.1 x ProcessPoolExecutor and 1.15 x the ideal; the line
    # is the lower of them, the one both are met under.
    bounds = [1.15 * best]
    executor = summary.get('process_pool_executor', {}).get('W7')
    if executor and executor['median'].get('seconds'):
        bounds.append(1.1 * executor['median']['seconds'])
    ax.axhline(min(bounds), color='#d62728', linewidth=0.9, linestyle='--',
               label=f'target {min(bounds):.2f} s (issue 13)')
    count = size_of(results, 'W7')
    return f'W7 {count:,} uneven CPU tasks, wall s' if count else None


def w8_lines(ax, results, summary, names):
    """W8's IO task alone and the target for its p90; returns the panel's title."""
    values = [summary[name]['W8']['median'] for name in names if 'W8' in summary[name]]
    values = [value for value in values if value.get('io_ms')]
    if not values:
        return None
    io, block = values[0]['io_ms'], values[0]['block_s']
    ax.axhline(io, color='black', linewidth=0.8, linestyle=':',
               label=f'an IO task alone, {io:.0f} ms')
    ax.axhline(3 * io, color='#d62728', linewidth=0.9, linestyle='--',
               label=f'target for p90, {3 * io:.0f} ms (issue 13)')
    # The lines in view however low the bars, and room above the bars for five legend
    # entries (three figures, two lines).
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, io / 2), high * 6)
    count = size_of(results, 'W8')
    return (f'W8 {count} IO tasks, a loop blocked {block:.1f} s, latency ms' if count
            else None)


def size_of(results, workload):
    sizes = [run['info']['size'] for run in results['runs']
             if run['workload'] == workload and run['info']]
    return sizes[0] if sizes else None


def info_panel(ax, results, names):
    ax.axis('off')
    lines = ['Each peer and workload in a fresh interpreter;',
             'bars are medians of the repetitions.', '']
    for peer in (results['peers'][name] for name in names):
        lines.append(f'{peer["label"]} (start method {peer.get("start_method", "?")}):')
        lines.extend(textwrap.wrap(peer.get('notes', ''), 70, initial_indent='  ',
                                   subsequent_indent='  '))
    lines.append('')
    lines.extend(textwrap.wrap(f'command: {results["command"]}', 70))
    ax.text(0, 1, '\n'.join(lines), va='top', fontsize=6.5, family='monospace',
            transform=ax.transAxes)


def number(value):
    if value >= 1_000_000:
        return f'{value / 1_000_000:.2f} M'
    if value >= 10_000:
        return f'{value / 1000:,.0f}k'
    if value >= 100:
        return f'{value:,.0f}'
    if value >= 10:
        return f'{value:.1f}'
    return f'{value:.2f}'


# -- One figure per question, for the manual ------------------------------------------------

# The order of the peers in every figure, top to bottom: looppool's ways first.
ORDER = ['looppool_submit', 'looppool_map', 'looppool_map_iter', 'looppool_batch_map',
         'looppool_put_nowait', 'looppool_remote', 'process_pool_executor',
         'process_pool_executor_map', 'aiomultiprocess_pool', 'aiomultiprocess_fork',
         'ceiling']
# The names a reader meets on the Performance page.
READER = {
    'looppool_submit': 'looppool submit()',
    'looppool_map': 'await looppool map()',
    'looppool_map_iter': 'async for over looppool map()',
    'looppool_batch_map': 'await looppool map(), handle_batch()',
    'looppool_put_nowait': 'looppool put_nowait() (0.3 style)',
    'looppool_remote': 'looppool through a host',
    'process_pool_executor': 'ProcessPoolExecutor, per call',
    'process_pool_executor_map': 'ProcessPoolExecutor.map()',
    'aiomultiprocess_pool': 'aiomultiprocess (spawn)',
    'aiomultiprocess_fork': 'aiomultiprocess (fork)',
    'ceiling': 'hand-written ceiling',
}

# (file name, workload, [(field, label)], title, axis label, log scale, better)
FIGURES = [
    ('bench-throughput.png', 'W1', [('msg_per_s', None)],
     'Tiny messages sent at once: messages per second',
     'messages per second (log scale)', True, 'more'),
    ('bench-latency.png', 'W2', [('p50_us', 'median'), ('p99_us', '99th percentile')],
     'One message at a time: round trip',
     'microseconds (log scale)', True, 'less'),
    ('bench-io.png', 'W3', [('seconds', None)],
     'Time for 2,000 tasks that each wait 50 ms',
     'seconds (log scale)', True, 'less'),
    ('bench-payload.png', 'W4', [('mib_per_s', None)],
     'Round trips of 1 MiB: MiB per second each way',
     'MiB per second', False, 'more'),
    ('bench-huge.png', 'W4XL', [('mib_per_s', None)],
     'Round trips of 256 MiB: MiB per second each way',
     'MiB per second', False, 'more'),
    ('bench-startup.png', 'W5', [('start_ms', 'start to first reply'), ('stop_ms', 'stop')],
     'Starting a pool of two and stopping it',
     'milliseconds (log scale)', True, 'less'),
    ('bench-cpu.png', 'W6', [('speedup_2', None)],
     'CPU-bound work: speed-up on two workers',
     'times as fast as one process', False, 'more'),
    ('bench-uneven.png', 'W7', [('seconds', None)],
     'Time for 200 uneven CPU-bound tasks',
     'seconds', False, 'less'),
    ('bench-blocked.png', 'W8',
     [('io_p50_ms', 'median'), ('io_p90_ms', '90th percentile'),
      ('io_p99_ms', '99th percentile')],
     'IO latency while one loop is held 0.6 s',
     'milliseconds (log scale)', True, 'less'),
    ('bench-memory.png', 'MEM', [('worker_uss_mib', 'its own (USS)'),
                                 ('worker_rss_mib', 'resident (RSS)')],
     'Memory of one idle worker', 'MiB', False, 'less'),
]

# Drawn at 7.2 x (0.5 + 0.42 per bar) inches and 200 dots an inch, the figures show at
# about half their pixel width in a text column of 720 px or so: the 10-point lettering
# then reads as 14 px.
WIDTH_IN, DPI = 7.2, 200


def render_figures(results, directory):
    """Write one PNG per question into ``directory``; return their paths."""
    summary = results['summary']
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, workload, fields, title, axis, log, better in FIGURES:
        peers = [peer for peer in ORDER + sorted(set(summary) - set(ORDER))
                 if workload in summary.get(peer, {})
                 and summary[peer][workload]['median']]
        if not peers:
            continue
        path = os.path.join(directory, name)
        figure_for(results, workload, peers, fields, title, axis, log, better, path)
        written.append(path)
    return written


def figure_for(results, workload, peers, fields, title, axis, log, better, path):
    """Horizontal bars, one group per peer, labelled with their values."""
    summary = results['summary']
    rows = len(peers) * len(fields)
    height = 1.3 + 0.26 * rows + 0.22 * len(peers)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, height))
    bar = 0.8 / len(fields)
    top = 0
    for index, (field, label) in enumerate(fields):
        alpha, hatch = STYLES[index]
        ys, values, colours = [], [], []
        for position, peer in enumerate(peers):
            value = summary[peer][workload]['median'].get(field)
            if value is None:
                continue
            ys.append(position + (index - (len(fields) - 1) / 2) * bar)
            values.append(value)
            colours.append(COLOURS.get(peer, '#333333'))
        bars = ax.barh(ys, values, height=bar * 0.9, color=colours, alpha=alpha,
                       hatch=hatch, edgecolor='white' if hatch is None else '#444444',
                       linewidth=0.4, label=label if label else '_nolegend_')
        for rect, value in zip(bars, values):
            # On a white ground: a reference line may run behind the figure.
            ax.annotate(number(value), (value, rect.get_y() + rect.get_height() / 2),
                        xytext=(4, 0), textcoords='offset points', va='center',
                        ha='left', fontsize=9,
                        bbox={'facecolor': 'white', 'edgecolor': 'none', 'pad': 0.6})
        top = max([top] + values)
    ax.set_yticks(range(len(peers)))
    ax.set_yticklabels([READER.get(peer, peer) for peer in peers], fontsize=10)
    ax.invert_yaxis()   # the first peer at the top
    ax.set_xlabel(f'{axis}; {better} is better', fontsize=10)
    ax.tick_params(axis='x', labelsize=9)
    if log:
        ax.set_xscale('log')
        low = min(summary[peer][workload]['median'].get(field) or top
                  for peer in peers for field, _ in fields)
        ax.set_xlim(low / 2, top * 6)   # room for the value after the longest bar
    else:
        ax.set_xlim(0, top * 1.25)
    reference_line(ax, results, workload, peers)
    ax.grid(axis='x', alpha=0.3)
    ax.set_axisbelow(True)
    for side in ('top', 'right'):
        ax.spines[side].set_visible(False)
    entries = len(ax.get_legend_handles_labels()[0])
    if entries:
        # Above the bars, under the title, where it can hide none of them.
        ax.legend(fontsize=9, loc='lower left', bbox_to_anchor=(0, 1.0),
                  ncol=min(entries, 2), frameon=False, borderaxespad=0.2)
    rows_of_legend = -(-entries // 2)
    ax.set_title(title, fontsize=11, loc='left', pad=6 + 17 * rows_of_legend)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def reference_line(ax, results, workload, peers):
    """The line some figures are read against: an ideal, or what the machine gives."""
    summary = results['summary']
    medians = [summary[peer][workload]['median'] for peer in peers]
    line = None
    if workload == 'W3':
        line = (0.05, 'ideal: 0.05 s')
    elif workload == 'W6':
        values = sorted(m['machine_speedup_2'] for m in medians if 'machine_speedup_2' in m)
        if values:
            value = values[len(values) // 2]
            line = (value, f'two bare processes: {value:.2f}')
    elif workload == 'W7':
        value = ideal(summary, peers)
        if value:
            line = (value, f'ideal: {value:.2f} s')
    elif workload == 'W8':
        values = [m['io_ms'] for m in medians if m.get('io_ms')]
        if values:
            line = (values[0], f'one IO task alone: {values[0]:.0f} ms')
    elif workload == 'MEM':
        values = sorted(m['bare_uss_mib'] for m in medians if 'bare_uss_mib' in m)
        if values:
            value = values[len(values) // 2]
            line = (value, f'bare Python with Tornado, USS: {value:.1f}')
    if line:
        ax.axvline(line[0], color='black', linewidth=0.9, linestyle=':', label=line[1])


def main():
    arguments = sys.argv[1:]
    default = os.path.join(HERE, 'results', 'latest.json')
    if arguments and arguments[0] == '--figures':
        directory = (arguments[1] if len(arguments) > 1
                     else os.path.join(HERE, '..', 'manual', '_static'))
        source = arguments[2] if len(arguments) > 2 else default
        with open(source) as results:
            for path in render_figures(json.load(results), directory):
                print(os.path.relpath(path))
        return
    source = arguments[0] if arguments else default
    target = arguments[1] if len(arguments) > 1 else os.path.splitext(source)[0] + '.png'
    with open(source) as results:
        render(json.load(results), target)
    print(target)


if __name__ == '__main__':
    main()
