"""Turn the repetitions into medians, a text table and the ratios the targets speak of."""

import statistics

# What each workload reports, in table order: (field, column heading, format).
COLUMNS = {
    'W1': [('msg_per_s', 'W1 msg/s', '{:,.0f}')],
    'W2': [('p50_us', 'W2 p50 us', '{:,.0f}'), ('p99_us', 'W2 p99 us', '{:,.0f}')],
    'W3': [('seconds', 'W3 s', '{:.3f}')],
    'W4': [('mib_per_s', 'W4 MiB/s', '{:,.0f}')],
    'W4L': [('mib_per_s', 'W4L MiB/s', '{:,.0f}'), ('peak_x', 'W4L peak x', '{:.2f}')],
    'W4XL': [('mib_per_s', 'W4XL MiB/s', '{:,.0f}'), ('peak_x', 'W4XL peak x', '{:.2f}')],
    'W5': [('start_ms', 'W5 start ms', '{:,.1f}'), ('stop_ms', 'W5 stop ms', '{:,.1f}')],
    'W6': [('speedup_1', 'W6 1w x', '{:.2f}'), ('speedup_2', 'W6 2w x', '{:.2f}')],
    'W7': [('seconds', 'W7 s', '{:.2f}')],
    'W8': [('io_p50_ms', 'W8 p50 ms', '{:,.0f}'), ('io_p90_ms', 'W8 p90 ms', '{:,.0f}'),
           ('io_p99_ms', 'W8 p99 ms', '{:,.0f}')],
    'W9': [('reload_ms', 'W9 reload ms', '{:,.0f}'), ('all_ms', 'W9 all ms', '{:,.0f}')],
    'MEM': [('worker_rss_mib', 'RSS MiB', '{:.1f}'), ('worker_uss_mib', 'USS MiB', '{:.1f}')],
}

# The looppool targets of issue 4, as (workload, field, other peer, relation, factor):
# 'x' means looppool's figure is at least factor times the other's (more is better),
# 'within' means at most factor times the other's (less is better).
TARGETS = [
    ('W1', 'msg_per_s', 'process_pool_executor', 'x', 15.0),
    ('W1', 'msg_per_s', 'aiomultiprocess_pool', 'x', 3.0),
    ('W1', 'msg_per_s', 'ceiling', 'x', 0.8),
    ('W2', 'p50_us', 'ceiling', 'within', 1.3),
    ('W3', 'seconds', 'ceiling', 'within', 1.5),
    ('W4', 'mib_per_s', 'ceiling', 'x', 1.0),
    ('W5', 'start_ms', 'ceiling', 'within', 3.0),
    ('W5', 'stop_ms', 'ceiling', 'within', 3.0),
]
# The targets are read on looppool's own API, submit(), and its bulk form map(). The
# Looppool 0.3 path (put_nowait in, a process_message call per result out, no replies to
# await) is held to the same figures and printed apart, for reference: it is the
# compatibility path, and its cost per message is the subject of the Performance page.
LOOPPOOL = ('looppool_submit', 'looppool_map')
REFERENCE = ('looppool_put_nowait',)

# The bulk calls side by side: looppool's map() (to a handle() worker, and to a
# handle_batch() worker) against ProcessPoolExecutor's own Executor.map with its best chunk
# size, on the workloads that send bursts, as (workload, field, 'more' or 'less' is better,
# target or None): a target is the least ratio sought where more is better (the most
# where less is), printed met or not; nothing asserts it.
BULK = ('looppool_map', 'process_pool_executor_map')
BULK_FIELDS = [
    ('W1', 'msg_per_s', 'more', 1.2),
    ('W3', 'seconds', 'less', None),
    ('W6', 'speedup_2', 'more', None),
]
BULK_BATCH = ('looppool_batch_map', 'process_pool_executor_map')
BULK_BATCH_FIELDS = [('W1', 'msg_per_s', 'more', 2.0)]
# map() iterated (async for) rather than awaited: the same chunks, a step of the caller's
# loop per reply; no target, for reference.
BULK_ITER = ('looppool_map_iter', 'process_pool_executor_map')
BULK_ITER_FIELDS = [('W1', 'msg_per_s', 'more', None)]


# The targets of issue 13 (how work is dealt to the workers), for the looppool peers that
# run W7 and W8, as (workload, field, against, factor): looppool's figure is to be at most
# factor times `against`, which is a peer, 'ideal' (W7's ideal time, from its task list) or
# 'io_task' (W8's IO task alone, 20 ms). Printed met or not; nothing asserts them.
DISPATCH = ('looppool_submit', 'looppool_map', 'looppool_remote')
DISPATCH_TARGETS = [
    ('W7', 'seconds', 'process_pool_executor', 1.1),
    ('W7', 'seconds', 'ideal', 1.15),
    ('W8', 'io_p90_ms', 'io_task', 3.0),
]


# The targets of issue 15 (big payloads, the remote path): (peer, workload,
# field, against, relation, factor): against is a peer (a ratio of the two figures) or
# None (the figure itself). Printed met or not; nothing asserts them.
ISSUE_15_TARGETS = [
    ('looppool_submit', 'W4', 'mib_per_s', 'ceiling', 'x', 2.0),
    ('looppool_submit', 'W4XL', 'mib_per_s', None, 'x', 800.0),
    ('looppool_submit', 'W4XL', 'peak_x', None, 'within', 1.3),
    ('looppool_remote', 'W1', 'msg_per_s', 'looppool_submit', 'x', 0.5),
    ('looppool_remote', 'W2', 'p50_us', 'looppool_submit', 'within', 1.5),
]   # (and the bulk calls' W1 targets, printed with the bulk ratios)


def brief(workload, record):
    """A few words about one repetition, for the progress line."""
    parts = []
    for field, heading, fmt in COLUMNS[workload]:
        if field in record:
            parts.append(f'{field} {fmt.format(record[field])}')
    parts.append(f'(wall {record["wall_s"]:.2f} s)')
    return ', '.join(parts)


def summarize(results):
    """{peer: {workload: {'reps': n, 'median': {field: value}, 'error': text}}}."""
    summary = {}
    for run in results['runs']:
        entry = summary.setdefault(run['peer'], {}).setdefault(
            run['workload'], {'reps': 0, 'values': {}, 'errors': []})
        for record in run['reps']:
            entry['reps'] += 1
            for field, value in record.items():
                if isinstance(value, (int, float)) and field != 'rep':
                    entry['values'].setdefault(field, []).append(value)
        if run['error']:
            entry['errors'].append(run['error'])
        if run['strays']:
            entry['errors'].append(f'left {len(run["strays"])} process(es) behind')
    for workloads in summary.values():
        for entry in workloads.values():
            entry['median'] = {field: statistics.median(values)
                               for field, values in entry.pop('values').items()}
            entry['error'] = '; '.join(entry.pop('errors')) or None
    return summary


def figure(summary, peer, workload, field):
    entry = summary.get(peer, {}).get(workload)
    if entry is None:
        return None
    return entry['median'].get(field)


def render(results):
    summary = results['summary']
    # The peers that ran something: with --workloads, some take part in none of them.
    names = [name for name in results['peers'] if name in summary]
    labels = {name: results['peers'][name]['label'] for name in names}
    workloads = [workload for workload in COLUMNS
                 if any(workload in summary.get(name, {}) for name in names)]
    lines = []
    m = results['machine']
    lines.append(f'looppool benchmarks, {results["mode"]} run, {results["date"]}')
    lines.append(f'{m["cpu"]}, {m["cpus"]} CPUs, {m["memory"]}, {m["system"]}, '
                 f'Python {m["python"]}; load average {m["load_before"][0]:.2f} before, '
                 f'{m["load_after"][0]:.2f} after; {results["seconds"]:.0f} s in all')
    lines.append('')

    # The main table: the median of each figure over the repetitions.
    columns = [(workload, field, heading, fmt) for workload in workloads
               for field, heading, fmt in COLUMNS[workload]]
    rows = [['peer'] + [heading for _, _, heading, _ in columns]]
    for name in names:
        row = [labels[name]]
        for workload, field, _, fmt in columns:
            entry = summary.get(name, {}).get(workload)
            value = figure(summary, name, workload, field)
            row.append('failed' if entry and entry['error'] and value is None
                       else '-' if value is None else fmt.format(value))
        rows.append(row)
    lines.extend(table(rows))
    lines.append('')

    # CPU: where the time went, per repetition.
    rows = [['CPU s per rep (parent+children)'] + workloads]
    for name in names:
        row = [labels[name]]
        for workload in workloads:
            parent = figure(summary, name, workload, 'cpu_parent_s')
            children = figure(summary, name, workload, 'cpu_children_s')
            row.append('-' if parent is None else f'{parent:.2f}+{children:.2f}')
        rows.append(row)
    lines.extend(table(rows))
    lines.append('')

    lines.extend(notes(results, summary, names, labels))
    lines.extend(targets(summary, names))
    lines.extend(bulk(summary, names, labels))
    lines.extend(dispatch(summary, names, labels))
    lines.extend(payloads(summary, names))
    return '\n'.join(lines) + '\n'


def notes(results, summary, names, labels):
    lines = []
    sizes = {}
    for run in results['runs']:
        if run['info']:
            sizes[run['workload']] = run['info']['size']
    describe = {
        'W1': lambda n: f'W1: {n:,} tiny echo messages at once, every reply awaited',
        'W2': lambda n: f'W2: {n:,} sequential round trips; latency percentiles',
        'W3': lambda n: f'W3: {n:,} tasks of `await asyncio.sleep(0.05)` at once; wall '
                        'seconds (ideal 0.05)',
        'W4': lambda n: f'W4: {n:,} sequential round trips of 1 MiB of bytes; payload MiB '
                        'per second (each way)',
        'W4L': lambda n: f'W4L: {n:,} sequential round trips of 64 MiB of bytes; MiB/s each '
                         'way, and the parent\'s peak RSS rise over the payload size',
        'W4XL': lambda n: f'W4XL: {n:,} sequential round trips of 256 MiB of bytes; as W4L',
        'W5': lambda n: 'W5: pool creation to first reply, then a clean stop (fresh '
                        'interpreter each time)',
        'W6': lambda n: f'W6: {n:,} CPU-bound tasks; speed-up over running them in one '
                        'process, with 1 and 2 workers',
        'W7': lambda n: f'W7: {n:,} CPU-bound tasks at once, every tenth spinning 100 ms and '
                        'the rest 1 ms; wall seconds',
        'W8': lambda n: f'W8: {n:,} IO tasks (sleep 0.02 s), one every 5 ms, sent while one '
                        'worker\'s loop spins on a CPU-bound task; latency of each, call to '
                        'reply, in ms',
        'MEM': lambda n: 'MEM: an idle worker; RSS counts pages shared with the parent, USS '
                         'only its own',
    }
    for workload, text in describe.items():
        if workload in sizes:
            lines.append(text(sizes[workload]))
    bare = [figure(summary, name, 'MEM', 'bare_rss_mib') for name in names]
    bare = [value for value in bare if value is not None]
    if bare:
        uss = [figure(summary, name, 'MEM', 'bare_uss_mib') for name in names]
        uss = [value for value in uss if value is not None]
        lines.append(f'     bare `python -c "import tornado"`: RSS {statistics.median(bare):.1f}'
                     f' MiB, USS {statistics.median(uss):.1f} MiB')
    machine = [figure(summary, name, 'W6', 'machine_speedup_2') for name in names]
    machine = [value for value in machine if value is not None]
    if machine:
        lines.append(f'     two bare processes, no pool, reach {statistics.median(machine):.2f}x '
                     'on this machine: the most W6 can show')
    lines.append('')
    for name in names:
        peer = results['peers'][name]
        reps = {workload: entry['reps'] for workload, entry in summary.get(name, {}).items()}
        lines.append(f'{labels[name]}: {peer.get("notes", "")}; start method '
                     f'{peer.get("start_method", "?")}; repetitions '
                     + ' '.join(f'{w}={n}' for w, n in reps.items()))
        for workload, entry in summary.get(name, {}).items():
            if entry['error']:
                lines.append(f'    {workload} FAILED: {entry["error"]}')
    lines.append('')
    return lines


def targets(summary, names):
    """Looppool's ratios against the targets; reported, never asserted."""
    lines = target_lines(summary, names, LOOPPOOL)
    if lines:
        lines.insert(0, 'Targets (issue 4), looppool / other, medians of this run:')
        lines.append('')
    reference = target_lines(summary, names, REFERENCE)
    if reference:
        lines.append('The Looppool 0.3 path against the same figures, for reference:')
        lines.extend(reference)
        lines.append('')
    return lines


def bulk(summary, names, labels):
    """looppool map() against the executor's map(): ratios, and their targets."""
    lines = bulk_lines(summary, names, labels, BULK, BULK_FIELDS)
    lines.extend(bulk_lines(summary, names, labels, BULK_BATCH, BULK_BATCH_FIELDS))
    lines.extend(bulk_lines(summary, names, labels, BULK_ITER, BULK_ITER_FIELDS))
    return lines


def bulk_lines(summary, names, labels, pair, fields):
    mine, other = pair
    if mine not in names or other not in names:
        return []
    lines = []
    for workload, field, better, target in fields:
        ours, theirs = (figure(summary, mine, workload, field),
                        figure(summary, other, workload, field))
        if ours is None or not theirs:
            continue
        ratio = ours / theirs
        # Two decimals, or two significant digits for a ratio far below one (W3's).
        shown = f'{ratio:7.2f}' if ratio >= 0.1 else f'{ratio:7.2g}'
        goal = ''
        if target is not None:
            met = ratio >= target if better == 'more' else ratio <= target
            goal = (f', target {"at least" if better == "more" else "at most"} {target}x: '
                    f'{"met" if met else "NOT met"}')
        lines.append(f'{mine:<20} {workload} {field:<10} {shown}x {other:<26} '
                     f'({better} is better{goal})')
    if lines:
        lines.insert(0, f'Bulk calls, {labels[mine]} / {labels[other]}, medians of this run:')
        lines.append('')
    return lines


def dispatch(summary, names, labels):
    """W7 and W8: every peer's ratios, then looppool's against the targets of issue 13."""
    lines = []
    w7 = [name for name in names if figure(summary, name, 'W7', 'seconds') is not None]
    if w7:
        ideal = statistics.median(figure(summary, name, 'W7', 'ideal_s') for name in w7)
        total = statistics.median(figure(summary, name, 'W7', 'task_total_s') for name in w7)
        executor = figure(summary, 'process_pool_executor', 'W7', 'seconds')
        lines.append(f'W7, uneven CPU-bound work, medians of this run. The ideal, {ideal:.3f} '
                     f's, is the larger of the tasks\' {total:.3f} s shared evenly by the '
                     'workers and the longest task.')
        rows = [['peer', 'W7 s', '/ ProcessPoolExecutor', '/ ideal']]
        for name in w7:
            seconds = figure(summary, name, 'W7', 'seconds')
            rows.append([labels[name], f'{seconds:.3f}',
                         f'{seconds / executor:.2f}x' if executor else '-',
                         f'{seconds / ideal:.2f}x'])
        lines.extend('    ' + line for line in table(rows))
        lines.append('')
    w8 = [name for name in names if figure(summary, name, 'W8', 'io_p90_ms') is not None]
    if w8:
        io = statistics.median(figure(summary, name, 'W8', 'io_ms') for name in w8)
        block = statistics.median(figure(summary, name, 'W8', 'block_s') for name in w8)
        lines.append(f'W8, IO tasks while one worker\'s loop is blocked for {block:.1f} s, '
                     f'medians of this run; an IO task alone takes {io:.0f} ms.')
        rows = [['peer', 'p50 ms', 'p90 ms', 'p99 ms', 'p90 / IO task', 'blocker s']]
        for name in w8:
            values = [figure(summary, name, 'W8', field)
                      for field in ('io_p50_ms', 'io_p90_ms', 'io_p99_ms', 'block_reply_s')]
            rows.append([labels[name]] + [f'{value:,.0f}' for value in values[:3]]
                        + [f'{values[1] / io:.1f}x', f'{values[3]:.3f}'])
        lines.extend('    ' + line for line in table(rows))
        lines.append('')
    targets = []
    for mine in DISPATCH:
        if mine not in names:
            continue
        for workload, field, against, factor in DISPATCH_TARGETS:
            ours = figure(summary, mine, workload, field)
            if against == 'ideal':
                theirs, shown = figure(summary, mine, workload, 'ideal_s'), 'ideal'
            elif against == 'io_task':
                theirs = figure(summary, mine, workload, 'io_ms')
                shown = f'IO task ({theirs:.0f} ms)' if theirs else ''
            else:
                theirs, shown = figure(summary, against, workload, field), against
            if ours is None or not theirs:
                continue
            ratio = ours / theirs
            targets.append(f'{mine:<20} {workload} {field:<10} {ratio:7.2f}x {shown:<22} '
                           f'(target <= {factor:g}x) {"met" if ratio <= factor else "MISSED"}')
    if targets:
        lines.append('Targets (issue 13, dealing work to the workers), looppool / other, '
                     'medians of this run:')
        lines.extend(targets)
        lines.append('')
    reload_ms = figure(summary, 'looppool_submit', 'W9', 'reload_ms')
    if reload_ms is not None:
        entry = summary['looppool_submit']['W9']
        lines.append(f'W9, reload (issue 14): from saving a worker module to the first reply '
                     f'of its new code {reload_ms:,.0f} ms, to every worker on it '
                     f'{figure(summary, "looppool_submit", "W9", "all_ms"):,.0f} ms (median '
                     f'of {entry["reps"]}; target <= 1,000 ms) '
                     f'{"met" if reload_ms <= 1000 else "MISSED"}')
        lines.append('')
    return lines


def payloads(summary, names):
    """looppool against the targets of issue 15; reported, never asserted."""
    lines = []
    for peer, workload, field, against, relation, factor in ISSUE_15_TARGETS:
        if peer not in names:
            continue
        ours = figure(summary, peer, workload, field)
        theirs = figure(summary, against, workload, field) if against else 1.0
        if ours is None or not theirs:
            continue
        value = ours / theirs
        met = value >= factor if relation == 'x' else value <= factor
        shown = f'{value:7.2f}x {against}' if against else f'{value:9,.2f}'
        wanted = f'>= {factor:g}' if relation == 'x' else f'<= {factor:g}'
        lines.append(f'{peer:<20} {workload:<4} {field:<10} {shown:<30} '
                     f'(target {wanted}) {"met" if met else "MISSED"}')
    if lines:
        lines.insert(0, 'Targets (issue 15: big payloads, the remote path, bulk calls), '
                     'medians of this run:')
        lines.append('')
    return lines


def target_lines(summary, names, mine_peers):
    lines = []
    for mine in mine_peers:
        if mine not in names:
            continue
        for workload, field, other, relation, factor in TARGETS:
            ours, theirs = (figure(summary, mine, workload, field),
                            figure(summary, other, workload, field))
            if ours is None or theirs is None or not theirs:
                continue
            ratio = ours / theirs
            met = ratio >= factor if relation == 'x' else ratio <= factor
            wanted = f'>= {factor:g}x' if relation == 'x' else f'<= {factor:g}x'
            lines.append(f'{mine:<20} {workload} {field:<10} {ratio:7.2f}x {other:<22} '
                         f'(target {wanted}) {"met" if met else "MISSED"}')
    return lines


def table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width)
                                             for cell, width in zip(row[1:], widths[1:])]
        out.append('  '.join(cells).rstrip())
        if index == 0:
            out.append('  '.join('-' * width for width in widths))
    return out
