/**
 * Replaces the block between `begin` and `end` marker lines of a text file (the block includes both
 * markers), or appends it when the file has none, leaving every other line as it was. Refuses a file whose
 * markers are unpaired or repeated: guessing there could delete an administrator's lines.
 */
export function replaceMarkedBlock(text: string, block: string, begin: string, end: string): string {
  const lines = text === '' ? [] : text.replace(/\n$/, '').split('\n');
  const starts = indexesOf(lines, begin);
  const ends = indexesOf(lines, end);
  if (starts.length === 0 && ends.length === 0) {
    const kept = lines.length > 0 && lines[lines.length - 1].trim() !== '' ? [...lines, ''] : lines;
    return [...kept, block].join('\n') + '\n';
  }
  if (starts.length !== 1 || ends.length !== 1 || ends[0] < starts[0])
    throw new Error(
      `the file has ${starts.length} "${begin}" and ${ends.length} "${end}" lines${
        starts.length === 1 && ends.length === 1 ? ' in the wrong order' : ''
      }: fix them by hand (keep one pair, or none)`,
    );
  return [...lines.slice(0, starts[0]), block, ...lines.slice(ends[0] + 1)].join('\n') + '\n';
}

function indexesOf(lines: string[], marker: string): number[] {
  return lines.flatMap((l, i) => (l.trim() === marker ? [i] : []));
}
