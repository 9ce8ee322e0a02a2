// Aligned text tables in the manner of kubectl: upper-case headers, columns
// separated by three spaces, no trailing padding.
#ifndef PORTFLEET_CTL_TABLE_H_
#define PORTFLEET_CTL_TABLE_H_

#include <cstddef>
#include <ostream>
#include <string>
#include <vector>

namespace portfleet::ctl {

class Table {
 public:
  explicit Table(std::vector<std::string> headers);
  void AddRow(std::vector<std::string> cells);
  // Columns at least this wide (e.g. the widths of an earlier print, so that
  // rows printed later by a watch line up).
  void SetMinWidths(std::vector<size_t> widths);
  // Column widths the next Print uses.
  std::vector<size_t> Widths(bool headers = true) const;
  void Print(std::ostream& out, bool headers = true) const;

 private:
  std::vector<std::vector<std::string>> rows_;  // rows_[0]: the headers
  std::vector<size_t> min_widths_;
};

}  // namespace portfleet::ctl

#endif  // PORTFLEET_CTL_TABLE_H_
