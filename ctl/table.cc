#include "ctl/table.h"

#include <algorithm>
#include <utility>

namespace portfleet::ctl {

Table::Table(std::vector<std::string> headers) {
  rows_.push_back(std::move(headers));
}

void Table::AddRow(std::vector<std::string> cells) {
  cells.resize(rows_.front().size());
  rows_.push_back(std::move(cells));
}

void Table::SetMinWidths(std::vector<size_t> widths) {
  min_widths_ = std::move(widths);
}

std::vector<size_t> Table::Widths(bool headers) const {
  const size_t columns = rows_.front().size();
  std::vector<size_t> width(columns, 0);
  for (size_t i = 0; i < columns && i < min_widths_.size(); ++i) {
    width[i] = min_widths_[i];
  }
  for (size_t r = headers ? 0 : 1; r < rows_.size(); ++r) {
    for (size_t i = 0; i < columns; ++i) {
      width[i] = std::max(width[i], rows_[r][i].size());
    }
  }
  return width;
}

void Table::Print(std::ostream& out, bool headers) const {
  const size_t columns = rows_.front().size();
  const std::vector<size_t> width = Widths(headers);
  for (size_t r = headers ? 0 : 1; r < rows_.size(); ++r) {
    std::string line;
    for (size_t i = 0; i < columns; ++i) {
      line += rows_[r][i];
      if (i + 1 < columns) line.append(width[i] - rows_[r][i].size() + 3, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out << line << "\n";
  }
}

}  // namespace portfleet::ctl
